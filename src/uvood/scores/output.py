"""V terms: functions of the logits z (and p = softmax(z / T)) alone. Higher = more ID.

Paper, Section 4.2 and Figure 1. All computed in float64.
"""

from __future__ import annotations

import math

import torch

from .registry import Score, register


def _f64(logits: torch.Tensor) -> torch.Tensor:
    return logits.detach().to(torch.float64)


def softmax(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """p^(k) = exp(z_k / T) / sum_k' exp(z_k' / T) (paper, Section 2), in float64."""
    return torch.softmax(_f64(logits) / T, dim=1)


def msp(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Maximum softmax probability: S_MSP = max_k p^(k) (Hendrycks & Gimpel; paper Section 4.2)."""
    return softmax(logits, T).amax(dim=1)


def energy(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Negative free energy: S_Energy = T * logsumexp(z / T) (Liu et al. 2020; paper Section 4.2).

    This is the negative of Liu et al.'s energy, so that higher = more ID. It can be negative
    (when every logit is below -T log C); then ``norm(p)*energy`` flips its orientation for that
    sample: a larger ||h||_p gives a smaller product (see ``ProductScore``).
    """
    return T * torch.logsumexp(_f64(logits) / T, dim=1)


def tv(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Total variation distance to the uniform: TV = 1/2 * sum_k |p^(k) - 1/C| (V term of Eq. 4)."""
    p = softmax(logits, T)
    return 0.5 * (p - 1.0 / p.shape[1]).abs().sum(dim=1)


def varsum(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """VarSum = 1 - sum_k p^(k) (1 - p^(k)) (Section 4.2; one minus the V term of Eq. 5).

    sum_k p(1-p) is the sum of the variances of the Bernoulli(p^(k)) class indicators; it is
    *larger* for uncertain (OOD) inputs, so the paper and uvood use 1 minus it.
    """
    p = softmax(logits, T)
    return 1.0 - (p * (1.0 - p)).sum(dim=1)


def maxlogit(logits: torch.Tensor) -> torch.Tensor:
    """Maximum logit: max_k z_k (Hendrycks et al. 2022)."""
    return _f64(logits).amax(dim=1)


def neg_entropy(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Negative predictive entropy: sum_k p^(k) log p^(k) (<= 0; higher = more confident = ID)."""
    logp = torch.log_softmax(_f64(logits) / T, dim=1)
    return (logp.exp() * logp).sum(dim=1)


class OutputScore(Score):
    """A V term: a pure function of the logits, with an optional temperature."""

    def __init__(self, fn, **params):
        self.fn = fn
        self.params = params

    def from_features(self, h, logits):
        return self.fn(logits, **self.params)


def _t_factory(fn):
    def factory(T=1.0):
        if not 0 < T < math.inf:  # T = inf would score every input inf (energy) or the uniform value (msp, tv)
            from ..errors import UvoodError

            raise UvoodError(f"Temperature T must be > 0 and finite, got {T}.")
        return OutputScore(fn, T=float(T))

    factory.__doc__ = fn.__doc__
    return factory


for _name, _fn in [("msp", msp), ("energy", energy), ("tv", tv), ("varsum", varsum), ("entropy", neg_entropy)]:
    register(_name, _t_factory(_fn), params={"T": 1.0}, kind="output", doc=_fn.__doc__)
register("maxlogit", lambda: OutputScore(maxlogit), kind="output", doc=maxlogit.__doc__)
