"""Functional entry points: score cached features or a model's inputs with any registered spec."""

from __future__ import annotations

import torch

from .batching import data_length
from .errors import UvoodError
from .progress import bar
from .scores.registry import Score, get_score
from .validation import check_features


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
                progress: bool = True, dtype=None) -> torch.Tensor:
    """Score raw inputs with ``model`` (needed for deep gradient scores); returns float64 (N,).

    ``data``: a tensor or array, an ``(x, y)`` pair or a DataLoader; every batch goes through
    :func:`uvood.validation.model_input` (uint8 images are scaled to [0, 1], image layouts follow
    :data:`uvood.validation.LAYOUT_RULE`, other dtypes are converted to the model's). A warning is
    given once when the inputs lie far outside the range the model declares
    (:func:`uvood.model.input_range`).

    ``dtype``: None runs the model in its own dtype. Deep gradient scores in float32 can depend on
    the batch a sample is in: the batched forward rounds differently from a single-sample one, and
    a ReLU or max-pool choice near a tie can flip (seen on 4 of 2,000 images, up to 2 % relative).
    ``dtype="float64"`` runs a float64 copy of the model, for scores of a sample that are the same
    whatever batch it is in (slower: about 2x on CPU).
    """
    from .devices import model_device
    from .distributed import dist, map_batches
    from .features import model_fingerprint
    from .model import input_range, model_channels, model_dtype, with_dtype
    from .validation import model_input, warn_range

    score = get_score(spec)
    if score.needs_fit and not score.state():
        raise UvoodError(f"Score {score.spec!r} must be fitted on ID data first: use uvood.Detector(...).fit(id_data).")
    model, head = with_dtype(model, head, dtype)
    run_dtype, channels, expected = model_dtype(model), model_channels(model), input_range(model)
    warned: dict = {}
    device = model_device(model)  # the inputs follow the model

    def one_batch(x, _y):
        if x.ndim > 0 and x.shape[0] == 0:
            return None
        x = model_input(x, run_dtype, channels).to(device)
        warn_range(x, expected, warned)
        return {"s": score.from_model(model, x, head).detach().to(torch.float64).cpu().numpy()}

    pbar = bar(data_length(data), score.spec, progress)
    try:
        out = map_batches(one_batch, data, batch_size, f"the score {score.spec}",
                          fingerprint=model_fingerprint(model) if dist() else "", progress=pbar.update)
    finally:
        pbar.close()
    if not out:
        raise UvoodError("The data is empty: nothing to score. Pass at least one sample.")
    return _checked_output(torch.from_numpy(out["s"]), score.spec)
