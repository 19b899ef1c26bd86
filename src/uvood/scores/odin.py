"""ODIN: temperature scaling and input perturbation (Liang et al., ICLR 2018, Eq. 1-2). Higher = more ID.

    x~ = x - eps * sign(-grad_x log S_yhat(x; T)),   S(x; T) = softmax(f(x) / T),  yhat = argmax_k f_k(x)
    S_ODIN(x) = max_k S_k(x~; T)

Paper defaults: T = 1000, eps = 0.0014 (its DenseNet/CIFAR-10 setting; pytorch-ood's and OpenOOD's
default too). uvood models take pixels in [0, 1] and normalise inside the model, so eps is a step in
pixel units, as in the paper's code (which divides the gradient by the normalisation's std).

The perturbation is computed for the whole batch at once: one forward pass, one backward pass of
sum_n -log S_yhat(x_n; T) (each sample's input gradient is its own: the model is in eval mode), one
forward pass of x~. pytorch-ood (``ODIN``): outlier score -max_k S_k(x~; T), ``uvood = -pood``.
"""

from __future__ import annotations

import math

import torch

from ..errors import UvoodError
from .output import msp
from .registry import Score, register


def odin_perturb(model, x: torch.Tensor, T: float = 1000.0, eps: float = 0.0014, head=None) -> torch.Tensor:
    """x~ = x - eps sign(grad_x sum_n -log S_yhat(x_n; T)), batched (module docstring)."""
    from ..model import eval_mode, forward_features

    with torch.enable_grad(), eval_mode(model):
        xg = x.detach().clone().requires_grad_(True)
        _, z = forward_features(model, xg, head)
        logp = torch.log_softmax(z / T, dim=1)
        loss = -logp.gather(1, z.argmax(dim=1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(loss, xg)
    return x.detach() - eps * grad.sign()


class ODINScore(Score):
    """ODIN (module docstring): MSP at temperature T of the perturbed input."""

    needs_model = True

    def __init__(self, T=1000.0, eps=0.0014):
        if isinstance(T, bool) or not isinstance(T, (int, float)) or not 0 < T < math.inf:
            raise UvoodError(f"odin: the temperature T must be a finite number > 0, got {T!r}.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
            raise UvoodError(f"odin: eps (the perturbation size) must be a finite number >= 0, got {eps!r}.")
        self.T, self.eps = float(T), float(eps)

    def from_model(self, model, x, head=None):
        from ..model import eval_mode, forward_features

        x_tilde = odin_perturb(model, x, self.T, self.eps, head)
        with torch.no_grad(), eval_mode(model):
            _, z = forward_features(model, x_tilde, head)
        return msp(z, self.T)


register("odin", ODINScore, params={"T": 1000.0, "eps": 0.0014}, kind="perturbation", doc=__doc__)
