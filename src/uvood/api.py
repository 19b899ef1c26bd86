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


def score_model(spec: str | Score | list, model: torch.nn.Module, data, batch_size: int = 128, head=None,
                progress: bool = True, dtype=None, precision: str | None = None):
    """Score raw inputs with ``model`` (needed for deep gradient scores); returns float64 (N,).

    ``spec``: one spec (returns a tensor), or a list of specs (returns ``{canonical spec: tensor}``):
    then every deep gradient score of the list (deep ``grad`` rows, GradNorm, ExGrad, deep BatchGrad)
    comes from ONE deep pass per batch (:func:`uvood.scores.fused.deep_pass`: one forward, the C label
    cotangents shared), and the scores computed from features share one forward.

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

    ``precision="bfloat16"``: the forward pass of the scores computed from features runs under bfloat16
    autocast (:mod:`uvood.precision`); the scores that backpropagate through the model stay float32.
    None: the default (``--precision``, float32). Refused with ``dtype="float64"``.
    """
    from .devices import model_device
    from .distributed import dist, map_batches
    from .features import model_fingerprint
    from .model import input_range, model_channels, model_dtype, with_dtype
    from .validation import model_input, warn_range

    many = isinstance(spec, (list, tuple))
    scores = [get_score(s) for s in (spec if many else [spec])]
    if not scores:
        raise UvoodError("score_model got an empty list of specs: pass at least one, e.g. ['gradnorm(depth=deep)'].")
    for score in scores:
        if score.needs_fit and not score.state():
            raise UvoodError(f"Score {score.spec!r} must be fitted on ID data first: use "
                             "uvood.Detector(...).fit(id_data).")
    from .precision import check

    precision = check(precision, dtype, model)
    model, head = with_dtype(model, head, dtype)
    run_dtype, channels, expected = model_dtype(model), model_channels(model), input_range(model)
    warned: dict = {}
    device = model_device(model)  # the inputs follow the model
    keys = {f"s{i}": sc.spec for i, sc in enumerate(scores)}  # part files name arrays by index, not by spec

    def one_batch(x, _y):
        if x.ndim > 0 and x.shape[0] == 0:
            return None
        x = model_input(x, run_dtype, channels).to(device)
        warn_range(x, expected, warned)
        values = _score_batch(scores, model, x, head, precision)
        return {k: values[spec].detach().to(torch.float64).cpu().numpy() for k, spec in keys.items()}

    names = ", ".join(keys.values())
    pbar = bar(data_length(data), names, progress)
    try:
        out = map_batches(one_batch, data, batch_size, f"the score(s) {names}",
                          fingerprint=model_fingerprint(model) if dist() else "", progress=pbar.update)
    finally:
        pbar.close()
    if not out:
        raise UvoodError("The data is empty: nothing to score. Pass at least one sample.")
    result = {spec: _checked_output(torch.from_numpy(out[k]), spec) for k, spec in keys.items()}
    return result if many else result[scores[0].spec]


def _score_batch(scores: list[Score], model, x: torch.Tensor, head, precision: str = "float32"
                 ) -> dict[str, torch.Tensor]:
    """Every score on one batch: the fusable deep ones from one deep pass, the plain feature scores from one
    forward (under bfloat16: every score computed from features, from one autocast forward), the rest by
    their own ``from_model`` (in float32)."""
    bf16 = precision == "bfloat16"
    if len(scores) == 1 and not (bf16 and not scores[0].needs_model):
        return {scores[0].spec: scores[0].from_model(model, x, head)}
    from .model import eval_mode
    from .precision import forward_features
    from .scores.fused import deep_pass, fusable

    out: dict[str, torch.Tensor] = {}
    deep = [sc for sc in scores if fusable(sc)]
    if deep:
        out.update(deep_pass(model, x, deep, head=head, batch_size=min(sc.batch_size for sc in deep)).scores)
    plain = [sc for sc in scores if not sc.needs_model and (bf16 or type(sc).from_model is Score.from_model)]
    if len(plain) > 1 or (bf16 and plain):
        with torch.no_grad(), eval_mode(model):
            h, logits = forward_features(model, x, head, precision)
        out.update({sc.spec: sc.from_features(h, logits) for sc in plain})
    for sc in scores:
        if sc.spec not in out:
            out[sc.spec] = sc.from_model(model, x, head)
    return out
