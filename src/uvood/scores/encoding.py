"""U terms: functions of the encoding h fed to the last layer. Higher = more ID.

U = ||h||_p for p in {0, 0.1, 0.3, ..., 6, inf} (paper, Section 4.3 and Figure 2); the score
``norm(p)`` is one, and products such as ``norm(0.3)*energy`` are the encoding-output scores.
"""

from __future__ import annotations

import math

import torch

from ..errors import UvoodError
from .registry import Score, register


def lp_norm(h: torch.Tensor, p: float) -> torch.Tensor:
    """||h||_p per row, in float64 and numerically safe.

    - p = 0: the number of non-zero entries (not a norm; the paper's limit case);
    - 0 < p < inf: (sum_i |h_i|^p)^(1/p), computed as m * (sum_i (|h_i|/m)^p)^(1/p) with
      m = max_i |h_i|, so that large p never overflows and rows of zeros give 0;
      for p < 1 this is a quasi-norm, and zero entries contribute 0 (0^p = 0);
    - p = inf: max_i |h_i|.
    """
    if p in (1.0, 2.0) and h.dtype in (torch.float32, torch.float16, torch.bfloat16):
        # |h_i| <= 3.4e38: the sum of |h_i| or of h_i^2 (<= 1.2e77 each) cannot overflow float64, nor can a square
        # of a float32 underflow there, so the scaling below (four more passes over h) is not needed
        a = h.detach().reshape(h.shape[0], -1).to(torch.float64)
        return a.abs().sum(dim=1) if p == 1.0 else (a * a).sum(dim=1).sqrt()
    a = h.detach().to(torch.float64).reshape(h.shape[0], -1).abs()
    if p == 0:
        return (a != 0).sum(dim=1).to(torch.float64)
    if math.isinf(p):
        return a.amax(dim=1)
    m = a.amax(dim=1, keepdim=True)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    s = ((a / safe) ** p).sum(dim=1, keepdim=True)
    return (m * s ** (1.0 / p)).squeeze(1)


class NormScore(Score):
    """U(h) = ||h||_p (Section 4.3)."""

    def __init__(self, p):
        if not isinstance(p, (int, float)) or isinstance(p, bool) or p < 0 or math.isnan(p):
            raise UvoodError(f"norm(p) needs p >= 0 (a number or inf), got {p!r}. Example: norm(0.3).")
        self.p = float(p)

    def from_features(self, h, logits):
        return lp_norm(h, self.p)


register("norm", NormScore, params={"p": None}, positional=("p",), kind="encoding", doc=lp_norm.__doc__)
