"""Gradient scores (paper Section 3, Table 1). Placeholder: shallow closed forms of Eq. 4 / Eq. 5.

The full family and the deep engine are built in issue 3.
"""

from __future__ import annotations

import torch

from .encoding import lp_norm
from .output import softmax
from .registry import Score, register


def gradnorm_shallow(h: torch.Tensor, logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Shallow GradNorm in closed form (Eq. 4): (1/T) * ||h||_1 * sum_k |1/C - p^(k)|.

    Equals || d KL(u || softmax(z/T)) / dW ||_1 for the last layer's weight W (Eq. 1-2).
    Higher = more ID.
    """
    p = softmax(logits, T)
    return lp_norm(h, 1.0) * (p - 1.0 / p.shape[1]).abs().sum(dim=1) / T


def exgrad_shallow(h: torch.Tensor, logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Shallow ExGrad in closed form (Eq. 5, Appendix B), oriented higher = more ID.

    The expected gradient norm E_{Y~p}[||grad_W log p^(Y)||_1] = (2/T) ||h||_1 sum_k p^(k)(1-p^(k))
    is *larger* for uncertain inputs; uvood returns its negative so that higher = more ID.
    """
    p = softmax(logits, T)
    return -(2.0 / T) * lp_norm(h, 1.0) * (p * (1.0 - p)).sum(dim=1)


class _Closed(Score):
    def __init__(self, fn, T):
        self.fn, self.T = fn, float(T)

    def from_features(self, h, logits):
        return self.fn(h, logits, self.T)


register("gradnorm", lambda T=1.0, depth="shallow": _Closed(gradnorm_shallow, T),
         params={"T": 1.0, "depth": "shallow"}, kind="gradient", doc=gradnorm_shallow.__doc__,
         choices={"depth": ("shallow",)})
register("exgrad", lambda T=1.0, depth="shallow": _Closed(exgrad_shallow, T),
         params={"T": 1.0, "depth": "shallow"}, kind="gradient", doc=exgrad_shallow.__doc__,
         choices={"depth": ("shallow",)})
