"""One deep pass, many scores: every deep gradient score of a list from ONE forward per micro-batch.

Every deep score of Table 1 and Table 3 is a reduction of the per-sample gradients of the
cotangents v at the logits (Appendix B: d log p^(k) / dz = (e_k - p) / T):

* ``mean_of_norm`` (ExGrad, Eq. 3, and its rows): raw = sum_k c_k ||g_k||, a weighted sum of the
  per-label norms ||g_k||_1 or ||g_k||_2^2 of the C label cotangents (e_k - p) / T;
* BatchGrad (Eq. 6): raw = sum_k p^(k) ||g_k + G||_1, the same C label gradients plus the anchor
  gradient G (a constant per model) before the l1 norm;
* ``norm_of_mean`` (GradNorm, Eq. 2): raw = ||sum_k c_k g_k||, the norm of the gradient of ONE
  combined cotangent (c - p sum_k c_k) / T;
* ``label=predicted, agg=norm_of_mean, weight=none``: identically zero by the score-function
  identity sum_k p^(k) grad log p^(k) = grad sum_k p^(k) = 0 (:mod:`uvood.scores.gradient`): its
  closed form is 0 for every input, with no deep pass (a pass would only measure round-off).

:func:`deep_pass` groups the requests by temperature T: per T, ONE row group of the C label
cotangents carries every per-label reduction (l1, l2sq, and l1 with each BatchGrad anchor offset),
and each distinct combined cotangent is one more row, all back-propagated through the same
forward graph (:func:`uvood.scores.engine.per_sample_grad_reductions`). The conv layers' per-sample
gradients of a label row are formed once and serve all its reductions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model import eval_mode
from .engine import Reduction, RowGroup, check_independent, per_sample_grad_reductions
from .gradient import DEEP_BATCH_SIZE, BatchGradScore, GradScore, _logit_cotangents, mean_of_norm_from_label_norms
from .output import softmax
from .registry import Score


def identically_zero(score: Score) -> bool:
    """True for ``grad(label=predicted, agg=norm_of_mean, weight=none)``, 0 for every input (module docstring)."""
    return (isinstance(score, GradScore) and score.label == "predicted" and score.agg == "norm_of_mean"
            and score.weight == "none")


def fusable(score: Score) -> bool:
    """Whether :func:`deep_pass` computes ``score``: a deep ``grad`` row or deep BatchGrad."""
    return isinstance(score, (GradScore, BatchGradScore)) and score.depth == "deep"


@dataclass
class _Slots:
    """Adds a reduction to the group being built once per request key, remembering (group, index)."""

    where: dict
    group: int
    reductions: list

    def __call__(self, key, red: Reduction) -> None:
        if key not in self.where:
            self.where[key] = (self.group, len(self.reductions))
            self.reductions.append(red)


@dataclass
class DeepPass:
    """What one :func:`deep_pass` returns: ``scores[spec]`` (N, float64, signed: higher = more ID),
    ``label_norms[T] = {"l1": C x N, "l2sq": C x N}`` where asked for, and the logits (N x C)."""

    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    label_norms: dict[float, dict[str, torch.Tensor]] = field(default_factory=dict)
    logits: torch.Tensor | None = None


def deep_pass(model, x: torch.Tensor, scores=(), *, label_norms=(), head=None,
              batch_size: int = DEEP_BATCH_SIZE, max_rows: int | None = None,
              max_memory: int | None = None) -> DeepPass:
    """Every score of ``scores`` (all :func:`fusable`) and the per-label norms at each temperature
    of ``label_norms``, from one engine pass over ``x`` (module docstring). Runs ``model`` in eval mode.
    ``batch_size``, ``max_rows``, ``max_memory``: as in :func:`uvood.scores.engine.per_sample_grad_norms`.

    Values equal those of each score's own ``from_model`` up to float round-off (tested against the
    float64 per-sample reference).
    """
    scores = list(scores)
    for sc in scores:
        if not fusable(sc):
            raise ValueError(f"deep_pass computes deep grad and BatchGrad scores, not {sc.spec!r}")
    with eval_mode(model):
        check_independent(model)
        temps: list[float] = []
        for T in [float(t) for t in label_norms] + [sc.T for sc in scores if not identically_zero(sc)]:
            if T not in temps:
                temps.append(T)
        groups: list[RowGroup] = []
        where: dict = {}  # request -> (group index, reduction index)
        for T in temps:
            reds: list[Reduction] = []
            slot = _Slots(where, len(groups), reds)
            if T in [float(t) for t in label_norms]:
                slot(("label", T, "l1"), Reduction("l1"))
                slot(("label", T, "l2sq"), Reduction("l2sq"))
            for sc in scores:
                if sc.T != T:
                    continue
                if isinstance(sc, BatchGradScore):
                    sc._check_fitted()
                    G = sc._anchor_gradient(model, head, x.dtype, x.device)
                    slot(("batchgrad", id(sc)), Reduction("l1", G))
                elif sc.agg == "mean_of_norm":
                    slot(("label", T, sc.norm), Reduction(sc.norm))
            if reds:
                groups.append(RowGroup(_logit_cotangents("uniform", "mean_of_norm", "none", T, False), tuple(reds)))
            combos: dict[tuple, list[str]] = {}
            for sc in scores:
                if sc.T == T and isinstance(sc, GradScore) and sc.agg == "norm_of_mean" and not identically_zero(sc):
                    combos.setdefault((sc.label, sc.weight, sc.official), [])
                    if sc.norm not in combos[(sc.label, sc.weight, sc.official)]:
                        combos[(sc.label, sc.weight, sc.official)].append(sc.norm)
            for (label, weight, official), norms in combos.items():
                for j, nm in enumerate(norms):
                    where[("combo", T, label, weight, official, nm)] = (len(groups), j)
                groups.append(RowGroup(_logit_cotangents(label, "norm_of_mean", weight, T, official),
                                       tuple(Reduction(nm) for nm in norms)))
        values, logits = [], None  # only closed-form scores: no pass at all
        if groups:
            values, logits = per_sample_grad_reductions(model, x, groups, head=head, batch_size=batch_size,
                                                        max_rows=max_rows, max_memory=max_memory)

    def get(key):
        gi, j = where[key]
        return values[gi][j]

    out = DeepPass(logits=logits)
    for T in label_norms:
        out.label_norms[float(T)] = {nm: get(("label", float(T), nm)) for nm in ("l1", "l2sq")}
    for sc in scores:
        if identically_zero(sc):
            out.scores[sc.spec] = torch.zeros(x.shape[0], dtype=torch.float64)
        elif isinstance(sc, BatchGradScore):
            out.scores[sc.spec] = -(softmax(logits, sc.T).T * get(("batchgrad", id(sc)))).sum(dim=0)
        elif sc.agg == "mean_of_norm":
            raw = mean_of_norm_from_label_norms(get(("label", sc.T, sc.norm)), logits, label=sc.label,
                                                weight=sc.weight, T=sc.T, official=sc.official)
            out.scores[sc.spec] = sc.sign * raw
        else:
            out.scores[sc.spec] = sc.sign * get(("combo", sc.T, sc.label, sc.weight, sc.official, sc.norm))[0]
    return out
