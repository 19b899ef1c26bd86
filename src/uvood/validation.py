"""Input checks done once, at the boundary (the scikit-learn ``utils/validation`` idea).

Each check raises :class:`uvood.errors.UvoodError` with a message that says what arrived,
what was expected and what to do about it.
"""

from __future__ import annotations

import warnings

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


LAYOUT_RULE = (
    "Images are read by one rule: N x H x W is a batch of greyscale images (a channel axis is added); "
    "a 4-D array is N x C x H x W when its second axis is the model's channel count (1 or 3 when unknown), "
    "else N x H x W x C when its last axis is; uint8 pixels (0..255) are scaled to [0, 1] by x / 255, float "
    "pixels are taken as they are (expected in [0, 1]). A single image needs its batch axis: x[None]."
)


def image_layout(x, name: str = "images", channels: int | None = None) -> torch.Tensor:
    """The layout half of :data:`LAYOUT_RULE`: N x H x W, N x H x W x C or N x C x H x W -> N x C x H x W
    (a view, same dtype). ``channels``: the model's channel count, when known."""
    x = as_tensor(x, name)
    check_nonempty(x, name)
    shape = tuple(x.shape)
    if x.ndim == 3:
        if channels is not None and channels != 1:
            raise UvoodError(
                f"{name} of shape {shape} are read as {shape[0]} greyscale images (N x H x W), but the model takes "
                f"{channels} channels. For one {channels} x H x W image add the batch axis (x[None]); for greyscale "
                f"images repeat the channel (x[:, None].expand(-1, {channels}, -1, -1)).")
        return x.unsqueeze(1)
    if x.ndim == 4:
        first = (shape[1] == channels) if channels is not None else shape[1] in (1, 3)
        last = (shape[3] == channels) if channels is not None else shape[3] in (1, 3)
        if first or (channels is None and not last):
            return x
        if last:
            return x.permute(0, 3, 1, 2)
        raise UvoodError(f"{name} of shape {shape} have neither N x {channels} x H x W nor N x H x W x {channels} "
                         f"layout, but the model takes {channels} channels. " + LAYOUT_RULE)
    raise UvoodError(f"{name} must be 3-D (N x H x W) or 4-D (N x H x W x C or N x C x H x W), got shape "
                     f"{shape}. " + LAYOUT_RULE)


def as_images(x, name: str = "images", channels: int | None = None, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    """:data:`LAYOUT_RULE` in full: any accepted layout, uint8 or float -> float N x C x H x W (``dtype``)."""
    x = image_layout(x, name, channels)
    if x.dtype == torch.uint8:
        return x.to(dtype).div_(255.0)
    if not x.is_floating_point():
        raise UvoodError(f"{name} must be uint8 (0..255) or float (0..1) pixels, got {x.dtype}.")
    return check_finite(x.to(dtype), name, "Replace or drop the images with NaN/inf pixels.")


def model_input(x, dtype: torch.dtype, channels: int | None = None, name: str = "input images") -> torch.Tensor:
    """A batch as the model takes it, by one rule for every entry point (extract, score_model, Detector):

    * empty -> :class:`UvoodError`; int / bool tensors other than uint8 -> :class:`UvoodError`;
    * uint8 -> images by :data:`LAYOUT_RULE` (scaled to [0, 1]);
    * float, for a model that takes images (``channels`` known: its first layer is a convolution) ->
      :data:`LAYOUT_RULE` (so N x H x W x C and a missing batch axis are handled or refused); for
      any other model the tensor is passed as it is (N first);
    * converted to ``dtype`` (the dtype the model runs in: float64 numpy arrays are fine).
    """
    x = as_tensor(x, name)
    check_nonempty(x, name)
    if x.dtype == torch.uint8 or (channels is not None and x.is_floating_point()):
        return as_images(x, name, channels, dtype)
    if not x.is_floating_point():
        raise UvoodError(f"{name} must be float (or uint8 images, 0..255), got {x.dtype}.")
    return check_finite(x.to(dtype), name, "Replace or drop the inputs with NaN/inf values.")


class RangeWarning(UserWarning):
    """Inputs far outside the input range a model declares (e.g. 0..255 pixels for a [0, 1] model)."""


def warn_range(x: torch.Tensor, expected: tuple[float, float] | None, state: dict, name: str = "input images"):
    """Warn once per ``state`` (one call of an entry point) when ``x`` lies far outside ``expected``
    (lo, hi): beyond lo - (hi - lo) or hi + (hi - lo), e.g. pixels in 0..255 for a model taking [0, 1]."""
    if expected is None or state.get("warned"):
        return
    lo, hi = expected
    width = hi - lo
    x_min, x_max = float(x.min()), float(x.max())
    if x_max > hi + width or x_min < lo - width:
        state["warned"] = True
        warnings.warn(f"{name} range over [{x_min:.4g}, {x_max:.4g}] but the model takes values in [{lo:g}, {hi:g}]"
                      + (" (pixels in 0..255? divide by 255)" if x_max > 2 * hi and x_max <= 255 else "")
                      + "; its scores on such inputs mean little.", RangeWarning, stacklevel=3)
