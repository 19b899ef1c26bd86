"""Functional entry points: score cached features or a model's inputs with any registered spec."""

from __future__ import annotations

import torch

from .batching import data_length, iter_batches
from .errors import UvoodError
from .progress import bar
from .scores.registry import Score, get_score
from .validation import check_features, check_finite


def _checked_output(s: torch.Tensor, spec: str) -> torch.Tensor:
    if not bool(torch.isfinite(s).all()):
        raise UvoodError(f"Score {spec!r} produced non-finite values; check the model's logits and features.")
    return s


def score_features(spec: str | Score, h, logits) -> torch.Tensor:
    """Score cached features: ``spec`` applied to ``(h, logits)`` -> float64 tensor of shape (N,).

    Higher = more in-distribution. ``spec`` is a registry spec such as ``'norm(0.3)*energy'``.
    """
    score = get_score(spec)
    h, logits = check_features(h, logits)
    return _checked_output(score.from_features(h, logits), score.spec)


def score_model(spec: str | Score, model: torch.nn.Module, data, batch_size: int = 128, head=None,
                progress: bool = True) -> torch.Tensor:
    """Score raw inputs with ``model`` (needed for deep gradient scores); returns float64 (N,).

    ``progress``: a bar counting images, on a terminal, for work longer than a few seconds.
    """
    score = get_score(spec)
    if score.needs_fit and not score.state():
        raise UvoodError(f"Score {score.spec!r} must be fitted on ID data first: use uvood.Detector(...).fit(id_data).")
    outs = []
    pbar = bar(data_length(data), score.spec, progress)
    for x, _ in iter_batches(data, batch_size):
        check_finite(x.float(), "input images")
        outs.append(score.from_model(model, x, head).detach().to(torch.float64).cpu())
        pbar.update(x.shape[0])
    pbar.close()
    if not outs:
        raise UvoodError("The data is empty: nothing to score.")
    return _checked_output(torch.cat(outs), score.spec)
