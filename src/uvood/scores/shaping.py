"""Activation and weight shaping: ReAct, ASH-P/B/S, SCALE, DICE; "shape, then score".

A shaping term changes the encoding h (or the head's weight W) before the logits are formed,
z' = W' h' + b, and then any score of the grammar is computed on (h', z'). The spec reads left to
right::

    chain := shaper ('>' shaper)* ['>' spec]        # spec: any product of the registry, default energy

    react(90)                  ReAct at the 90th percentile, then Energy (the papers' default)
    react(90)>energy           the same
    react(90)>msp              ReAct, then MSP of the shaped logits
    react(90)>norm(1)*energy   ReAct, then ||h'||_1 * Energy(z'): every factor sees the shaped (h', z')
    react(90)>dice(90)>energy  ReAct, then DICE (fitted on the clipped h), then Energy

Statistics of a later term (a shaper's percentile, a fitted score's means) are fitted on the
features shaped by the terms before it. Shaping needs the head's W and b, which ``fit`` reads
from the model (every shaping spec must therefore be fitted, even ASH and SCALE, which learn
nothing else). A score that needs the model itself (deep gradients, ODIN) cannot follow a shaper.

``p`` is a percentile in (0, 100) everywhere (pytorch-ood uses fractions in [0, 1]: p = 100 x).
The shaped h' is the flattened head input, N x D; the papers apply ASH to the feature maps before
pooling, pytorch-ood to any B x C x H x W tensor; on h (B x D x 1 x 1) both definitions coincide.
All scores: higher = more in-distribution (Energy = T logsumexp(z / T), the negative free energy).

The registry's tokenizer does not know '>': :func:`compose` parses a chain; ``get_score`` hands a
spec that contains '>' to it (see the module docstring of :mod:`uvood.scores.registry`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UvoodError
from .fitted import FittedScore, factors, fit_on_features
from .registry import Score, get_score, register

DEFAULT_THEN = "energy"


def check_percentile(p, name: str) -> float:
    """A percentile strictly inside (0, 100)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not 0 < p < 100:
        raise UvoodError(f"{name}: the percentile p must be a number strictly between 0 and 100, got {p!r} "
                         f"(pytorch-ood's fractions are p / 100). Example: {name}(90).")
    return float(p)


def kept_count(d: int, p: float) -> int:
    """k = D - round(D p / 100): how many of D activations ASH and SCALE keep (round half to even, as numpy)."""
    return d - int(np.round(d * (p / 100.0)))


class Shaper:
    """One shaping term: statistics fitted on ID features, then ``h -> h'`` and/or ``W -> W'``."""

    name = "shaper"
    _keys: tuple[str, ...] = ()

    def fit(self, h: torch.Tensor, weight: torch.Tensor) -> None:
        """Fit on ID features h (n x D, float64) and the head's current weight W (C x D)."""

    def shape_h(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def shape_w(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


class ReAct(Shaper):
    """ReAct (Sun et al., NeurIPS 2021, Eq. 1): h' = min(h, c), c the p-th percentile of all ID
    training activations (every entry of every h, numpy's linear interpolation). Paper default p = 90."""

    _keys = ("threshold",)

    def __init__(self, p):
        self.p = check_percentile(p, "react")
        self.threshold = None

    def fit(self, h, weight):
        self.threshold = torch.tensor([float(np.percentile(h.numpy().reshape(-1), self.p))], dtype=torch.float64)

    def shape_h(self, h):
        return h.clamp(max=float(self.threshold))


def sharpening(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """exp(s1 / s2), the ASH-S and SCALE factor; 1 where s2 = 0. With ReLU features s2 = 0 means h = 0
    (the k largest activations are all 0), where the papers' 0/0 is undefined and any finite factor gives
    h' = 0: uvood uses 1 (pytorch-ood returns NaN there)."""
    zero = s2 == 0
    return torch.where(zero, torch.ones_like(s1), torch.exp(s1 / torch.where(zero, torch.ones_like(s2), s2)))


def _top(h: torch.Tensor, p: float):
    k = kept_count(h.shape[1], p)
    if k < 1:
        raise UvoodError(f"p = {p} keeps no activation of D = {h.shape[1]}: use a smaller percentile.")
    vals, idx = torch.topk(h, k, dim=1)
    return k, vals, idx


class ASH(Shaper):
    """ASH (Djurisic et al., ICLR 2023, Section 3), per sample, keeping the k = D - round(D p/100)
    largest activations and zeroing the rest:

    * ``p``: kept as they are (ASH-P);
    * ``b``: each kept one set to s1 / k, s1 = sum_j h_j (ASH-B: binarised, sum preserved);
    * ``s``: kept ones multiplied by exp(s1 / s2), s2 = their sum (ASH-S: sharpened).

    Paper defaults (ImageNet, ResNet-50, Table 1): ASH-P p = 60, ASH-B p = 65, ASH-S p = 90. Ties
    at the k-th value are broken as ``torch.topk`` does (as pytorch-ood).
    """

    def __init__(self, variant, p):
        self.variant, self.p = variant, check_percentile(p, f"ash_{variant}")

    def shape_h(self, h):
        k, vals, idx = _top(h, self.p)
        s1 = h.sum(1, keepdim=True)
        if self.variant == "b":
            vals = (s1 / k).expand_as(vals)
        elif self.variant == "s":
            vals = vals * sharpening(s1, vals.sum(1, keepdim=True))
        return torch.zeros_like(h).scatter_(1, idx, vals)


class SCALE(Shaper):
    """SCALE (Xu et al., ICLR 2024, Eq. 4): h' = h exp(s1 / s2), s1 = sum_j h_j, s2 = the sum of the
    k = D - round(D p/100) largest activations; nothing is pruned. Default p = 85: uvood's choice inside
    the sweep 65-95 of OpenOOD and pytorch-ood (pytorch-ood's own default is 65); tune it on ID data."""

    def __init__(self, p):
        self.p = check_percentile(p, "scale")

    def shape_h(self, h):
        _, vals, _ = _top(h, self.p)
        return h * sharpening(h.sum(1, keepdim=True), vals.sum(1, keepdim=True))


class DICE(Shaper):
    """DICE (Sun & Li, ECCV 2022, Eq. 3-4): W' = W * M, M_cj = 1 where the contribution
    m_j W_cj is above its p-th percentile over all (c, j) (torch.quantile, linear), m the mean ID
    feature; h unchanged. Paper default p = 90 (CIFAR; 70 for ImageNet)."""

    _keys = ("mask",)

    def __init__(self, p):
        self.p = check_percentile(p, "dice")
        self.mask = None

    def fit(self, h, weight):
        contrib = h.mean(0)[None, :] * weight
        threshold = torch.quantile(contrib.reshape(-1), self.p / 100.0)
        self.mask = (contrib > threshold).to(torch.float64)

    def shape_w(self, weight):
        if self.mask.shape != weight.shape:
            raise UvoodError(f"dice: the mask was fitted for a head of shape {tuple(self.mask.shape)}, "
                             f"got {tuple(weight.shape)}: fit it again.")
        return weight * self.mask


class ShapedScore(FittedScore):
    """Shapers applied in order, then ``inner`` on (h', z' = W' h' + b) (module docstring)."""

    needs_head = True
    _keys = ("weight", "bias")

    def __init__(self, shapers: list[Shaper], inner: Score):
        if inner.needs_model:
            raise UvoodError(f"Score {inner.spec!r} needs the model itself (gradients or input perturbation) and "
                             "cannot follow a shaping term, which acts on the cached (h, logits). Use an output, "
                             "encoding, shallow gradient or fitted score after '>'.")
        if any(f.needs_fit and not isinstance(f, FittedScore) for f in factors(inner)):
            raise UvoodError(f"Score {inner.spec!r} cannot follow a shaping term: it is fitted on the model, "
                             "not on features.")
        self.shapers, self.inner = shapers, inner
        self.method = "shaping"
        super().__init__()

    def shaped(self, h: torch.Tensor, upto: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h', z') after the first ``upto`` shapers (all by default)."""
        w = self.weight
        for s in self.shapers[:upto]:
            h, w = s.shape_h(h), s.shape_w(w)
        return h, h @ w.T + self.bias

    def _fit(self, h, logits, y, weight, bias):
        self.weight, self.bias = weight, bias
        w = weight
        for s in self.shapers:
            s.fit(h, w)
            h, w = s.shape_h(h), s.shape_w(w)
        fit_on_features(self.inner, h, h @ w.T + bias, y, weight=w, bias=bias)

    def _score(self, h, logits):
        return self.inner.from_features(*self.shaped(h))

    def state(self):
        out = super().state()
        if not out:
            return out
        for i, s in enumerate(self.shapers):
            out.update({f"shaper{i}.{k}": getattr(s, k) for k in s._keys})
        out.update({f"inner.{k}": v for k, v in self.inner.state().items()})
        return out

    def load_state(self, state):
        own = {k: v for k, v in state.items() if "." not in k}
        super().load_state(own)
        for i, s in enumerate(self.shapers):
            for k in s._keys:
                if f"shaper{i}.{k}" not in state:
                    raise UvoodError(f"Score {self.spec!r}: the file lacks the fitted shaper{i}.{k}. Fit it again.")
                setattr(s, k, state[f"shaper{i}.{k}"].to(torch.float64))
        inner = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("inner.")}
        if inner or self.inner.needs_fit:
            self.inner.load_state(inner)


def compose(spec: str) -> ShapedScore:
    """Parse a chain ``shaper > shaper > ... [> spec]`` (module docstring) into a :class:`ShapedScore`."""
    if not isinstance(spec, str) or not spec.strip():
        raise UvoodError(f"A score spec must be a non-empty string, got {spec!r}. Example: 'react(90)>energy'.")
    parts = [part.strip() for part in spec.split(">")]
    if any(not part for part in parts):
        raise UvoodError(f"Cannot parse score spec {spec!r}: empty term around '>'. Example: 'react(90)>energy'.")
    shapers, names = [], []
    for i, part in enumerate(parts):
        score = get_score(part)
        if isinstance(score, ShapedScore):
            if score.inner.spec != DEFAULT_THEN or len(score.shapers) != 1:
                raise UvoodError(f"Cannot parse score spec {spec!r}: {part!r} is not a single shaping term.")
            shapers.append(score.shapers[0])
            names.append(score.spec)
            continue
        if i != len(parts) - 1:
            raise UvoodError(f"Cannot parse score spec {spec!r}: {part!r} is not a shaping term (react, ash_p, "
                             "ash_b, ash_s, scale, dice); only the last term after '>' may be another score.")
        inner = score
        break
    else:
        inner = get_score(DEFAULT_THEN)
    if not shapers:
        raise UvoodError(f"Cannot parse score spec {spec!r}: '>' must follow a shaping term, e.g. 'react(90)>msp'.")
    out = ShapedScore(shapers, inner)
    out.spec = ">".join(names + ([] if inner.spec == DEFAULT_THEN else [inner.spec]))
    out.version_tag = ">".join([get_score(n).version_tag for n in names] + [inner.version_tag])
    return out


def _factory(make):
    def factory(**params):
        return ShapedScore([make(**params)], get_score(DEFAULT_THEN))

    factory.__doc__ = make.__doc__
    return factory


register("react", _factory(ReAct), params={"p": 90}, positional=("p",), kind="shaping", doc=ReAct.__doc__)
# version 2 of ash_s and scale: a finite factor for an all-zero encoding (:func:`sharpening`), NaN before
for _variant, _p in (("p", 60), ("b", 65), ("s", 90)):
    register(f"ash_{_variant}", _factory(lambda p, v=_variant: ASH(v, p)), params={"p": _p}, positional=("p",),
             kind="shaping", doc=ASH.__doc__, version=2 if _variant == "s" else 1)
register("scale", _factory(SCALE), params={"p": 85}, positional=("p",), kind="shaping", doc=SCALE.__doc__, version=2)
register("dice", _factory(DICE), params={"p": 90}, positional=("p",), kind="shaping", doc=DICE.__doc__)

