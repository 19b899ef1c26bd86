"""GEN, the generalised entropy of the softmax (Liu et al., CVPR 2023, Eq. 6). Higher = more ID.

    S_GEN(x) = -sum_{j in top-M} p_j^gamma (1 - p_j)^gamma,   p = softmax(z)

over the M largest probabilities (all of them when M >= C). Paper defaults: gamma = 0.1, M = 100
(ImageNet; for C <= 100 every class counts). The sum is larger for flat (OOD) posteriors, so uvood
returns its negative. ``eps`` > 0 first clamps p to [eps, 1 - eps].

pytorch-ood 0.4.0 (``GEN``) averages instead of summing and clamps p to [1e-7, 1 - 1e-7], an outlier
score: ``gen(gamma, M=C, eps=1e-7) = -C * pood.GEN(gamma, M=None)``; with M < C, ``-M * pood``.
"""

from __future__ import annotations

import math

import torch

from ..errors import UvoodError
from .output import softmax
from .registry import Score, register


def gen(logits: torch.Tensor, gamma: float = 0.1, M: int = 100, eps: float = 0.0) -> torch.Tensor:
    """S_GEN (module docstring), float64."""
    p = softmax(logits)
    if eps > 0:
        p = p.clamp(eps, 1.0 - eps)
    if M < p.shape[1]:
        p = torch.topk(p, M, dim=1).values
    return -(p.pow(gamma) * (1.0 - p).pow(gamma)).sum(dim=1)


class GENScore(Score):
    """GEN (module docstring)."""

    def __init__(self, gamma=0.1, M=100, eps=0.0):
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < math.inf:
            raise UvoodError(f"gen: gamma must be a finite number > 0, got {gamma!r}. Example: gen(gamma=0.1).")
        if isinstance(M, bool) or not isinstance(M, int) or M < 1:
            raise UvoodError(f"gen: M must be an integer >= 1 (the number of top classes), got {M!r}.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 0.5:
            raise UvoodError(f"gen: eps (the probability clamp) must be in [0, 0.5), got {eps!r}.")
        self.gamma, self.M, self.eps = float(gamma), M, float(eps)

    def from_features(self, h, logits):
        return gen(logits, self.gamma, self.M, self.eps)


register("gen", GENScore, params={"gamma": 0.1, "M": 100, "eps": 0.0}, kind="output", doc=__doc__)
