"""Input checks done once, at the boundary (the scikit-learn ``utils/validation`` idea).

Each check raises :class:`uvood.errors.UvoodError` with a message that says what arrived,
what was expected and what to do about it.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import UvoodError


def as_tensor(x, name: str = "input") -> torch.Tensor:
    """Return ``x`` as a tensor (numpy arrays are converted without copy where possible)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise UvoodError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}.")


def check_finite(x: torch.Tensor, name: str, fix: str = "") -> torch.Tensor:
    """Raise if ``x`` holds NaN or +-inf; ``fix`` is appended to the message."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = ~torch.isfinite(x)
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(bad.sum()) - n_nan
        where = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten()[:5].tolist() if x.ndim else []
        raise UvoodError(
            f"{name} contains {n_nan} NaN and {n_inf} infinite value(s) (first rows: {where}). "
            + (fix or "Remove or repair those rows before scoring.")
        )
    return x


def check_nonempty(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 0 or x.shape[0] == 0:
        raise UvoodError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one sample.")
    return x


def check_features(h: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a (h, logits) pair: 2-D, same N, non-empty, finite, at least 2 classes."""
    h = as_tensor(h, "h")
    logits = as_tensor(logits, "logits")
    if logits.ndim != 2:
        raise UvoodError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}.")
    if h.ndim == 1:
        raise UvoodError(f"h must be 2-D (N, D), got shape {tuple(h.shape)}; use h.unsqueeze(0) for one sample.")
    if h.ndim > 2:
        h = h.reshape(h.shape[0], -1)
    if h.shape[0] != logits.shape[0]:
        raise UvoodError(
            f"h has {h.shape[0]} rows but logits has {logits.shape[0]}; they must come from the same inputs."
        )
    check_nonempty(logits, "logits")
    if logits.shape[1] < 2:
        raise UvoodError(f"logits must have at least 2 classes, got C = {logits.shape[1]}.")
    check_finite(logits, "logits", "The model produced non-finite logits: check its inputs and weights.")
    check_finite(h, "h (penultimate features)", "The model produced non-finite features: check its inputs.")
    return h, logits


def check_images(x: torch.Tensor, expected_channels: int | None = None, name: str = "images") -> torch.Tensor:
    """Validate an image batch N x C x H x W (finite, non-empty, right channel count)."""
    x = as_tensor(x, name)
    check_nonempty(x, name)
    if x.ndim != 4:
        raise UvoodError(
            f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}. "
            "Add a batch axis with x.unsqueeze(0), or a channel axis with x.unsqueeze(1)."
        )
    if expected_channels is not None and x.shape[1] != expected_channels:
        raise UvoodError(
            f"{name} have {x.shape[1]} channel(s) but the model expects {expected_channels}. "
            "Convert them (grey->RGB: x.expand(-1, 3, -1, -1); RGB->grey: x[:, :1]) or use "
            "uvood.data.transforms.to_model_format."
        )
    check_finite(x.float() if not x.is_floating_point() else x, name)
    return x
