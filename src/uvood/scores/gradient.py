"""Gradient scores (paper Section 3, Table 1 and Section 4.4): closed forms and the deep engine.

Notation: z = logits of the head (N x C), p = softmax(z / T), h = the head's input (N x D),
``log p^(k)`` the log-probability of class k. For a label k,

    d log p^(k) / dz = (e_k - p) / T                               (Appendix B)

and, for the head z = W h + b, grad_W log p^(k) = (e_k - p) h^T / T, grad_b = (e_k - p) / T
("h augmented with a 1" covers the bias).

One general score, ``grad(label, agg, norm, weight, depth, T, bias, official)``:

* label: the distribution of the synthetic label Y: ``uniform`` (q_k = 1/C) or ``predicted``
  (q_k = p^(k), Y ~ p(x));
* weight: ``none`` (w_k = 1) or ``logp_over_p`` (w_k = log p^(k) / p^(k), the importance
  weighted rows of Table 1; with label=predicted the coefficient q_k w_k = log p^(k));
* agg: ``norm_of_mean`` = || E_Y[w_Y grad log p^(Y)] || (GradNorm, Eq. 2) or ``mean_of_norm``
  = E_Y[w_Y || grad log p^(Y) ||] (ExGrad, Eq. 3);
* norm: ``l1`` or ``l2sq`` (squared Euclidean norm), over all chosen parameters together;
* depth: ``shallow`` = the head's weight W (plus its bias b with bias=true), computed in
  closed form from cached (h, logits), no backward; ``deep`` = every parameter with
  ``requires_grad`` (the head's bias included), computed by :mod:`uvood.scores.engine`;
* official: label weights 1 instead of 1/C, i.e. the loss sum_k -log p^(k) of the official
  GradNorm code (targets of ones), C times the KL gradient; label=uniform only.

Presets: ``gradnorm`` = grad(label=uniform, agg=norm_of_mean, norm=l1) (Eq. 1-2, Eq. 4) and
``exgrad`` = grad(label=predicted, agg=mean_of_norm, norm=l1) (Eq. 3, Eq. 5); ``batchgrad`` is
Eq. 6.

Shallow closed forms, with c_k = q_k w_k, U_1 = ||h~||_1, U_2 = ||h~||_2^2 (h~ = h, or [h, 1]
with bias=true):

* norm_of_mean:  m = (c - p sum_k c_k) / T;  raw = U_1 ||m||_1  or  U_2 ||m||_2^2.
  uniform: m = (1/C - p) / T, so raw = (1/T) ||h||_1 sum_k |1/C - p^(k)| (Eq. 4);
  predicted: m = p (1 - sum_k p^(k)) / T = 0 (score-function identity, see below).
* mean_of_norm:  ||e_k - p||_1 = 2 (1 - p^(k)),  ||e_k - p||_2^2 = 1 - 2 p^(k) + ||p||_2^2;
  raw = (2/T) U_1 sum_k c_k (1 - p^(k))  or  (1/T^2) U_2 sum_k c_k (1 - 2 p^(k) + ||p||^2).
  predicted l1: (2/T) ||h||_1 sum_k p^(k) (1 - p^(k)) (Eq. 5, ExGrad);
  predicted l2sq: (1/T^2) ||h||_2^2 (1 - ||p||_2^2);
  uniform l1: (2/T) ||h||_1 (1 - 1/C), independent of p;
  uniform l2sq: (1/T^2) ||h||_2^2 (1 - 2/C + ||p||_2^2);
  predicted logp_over_p l2sq: (1/T^2) ||h||_2^2 sum_k log p^(k) (1 - 2 p^(k) + ||p||^2) (<= 0).

Orientation (every uvood score is "higher = more in-distribution"): the score is
``sign * raw`` with a FIXED sign per axis combination, chosen by whether the output part V of
the closed form grows with confidence; nothing is flipped after the fact:

* agg=norm_of_mean: +1 (uniform: V = sum |1/C - p| grows with confidence; predicted: the
  value is identically 0, see below; predicted + logp_over_p: V vanishes at p = 1/C and grows
  with confidence);
* agg=mean_of_norm, label=uniform, weight=none: +1 (l1: V constant, only ||h||; l2sq:
  V = 1 - 2/C + ||p||^2 grows with confidence);
* agg=mean_of_norm, label=predicted: -1 (weight=none: V = sum p(1-p) or 1 - ||p||^2 grow with
  uncertainty; logp_over_p: raw = sum_k log p^(k) ||grad log p^(k)||^2 is more negative for
  confident inputs);
* batchgrad: -1.

The score-function identity: sum_k p^(k) grad log p^(k) = grad sum_k p^(k) = grad 1 = 0, so
``grad(label=predicted, agg=norm_of_mean, ...)`` is identically zero for every input and
every depth. The shallow closed form computes it honestly (the cotangent p (1 - sum_k p^(k)) / T
in float64, ~1e-16 noise); the deep score is its closed form, exactly 0 for every input, with no
deep pass (a pass over the float64 cotangent gave ~1e-16 noise, version 1); the paper's AUROCs for
these rows (0.725 deep, 0.741 shallow, Table 1) can only come from float32 round-off or Monte
Carlo label sampling (the seed code summed p_k * grad_k in float32 over 10 backward passes).
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from ..errors import UvoodError
from .encoding import lp_norm
from .engine import per_sample_grad_norms
from .output import softmax
from .registry import Score, register

LABELS = ("uniform", "predicted")
AGGS = ("norm_of_mean", "mean_of_norm")
NORMS = ("l1", "l2sq")
WEIGHTS = ("none", "logp_over_p")
DEPTHS = ("shallow", "deep")
BOOLS = (False, True)

#: version of the deep per-label norms (:func:`deep_label_norms` and the engine under it): bump it when a
#: change alters their values; it enters the benchmark's label-norm cache key
LABEL_NORMS_VERSION = 1

#: samples per forward/backward micro-batch of the deep engine (memory bound; no effect on values)
DEEP_BATCH_SIZE = 128

# elements allowed per chunk of materialised shallow BatchGrad gradients
_CHUNK = 2**22


def orientation(label: str, agg: str, weight: str = "none") -> int:
    """The fixed sign that makes ``sign * raw`` higher for in-distribution inputs (module docstring)."""
    if agg == "norm_of_mean":
        return 1
    if weight == "logp_over_p":
        return -1
    return 1 if label == "uniform" else -1


def check_axes(label: str, agg: str, norm: str, weight: str, depth: str, T: float, bias: bool,
               official: bool) -> None:
    """Validate a combination of axes (single values are checked by the registry's ``choices``)."""
    for key, value, valid in (("label", label, LABELS), ("agg", agg, AGGS), ("norm", norm, NORMS),
                              ("weight", weight, WEIGHTS), ("depth", depth, DEPTHS)):
        if value not in valid:
            raise UvoodError(f"{key}={value!r} is not valid; choose one of {', '.join(valid)}.")
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not T > 0 or math.isinf(T):
        raise UvoodError(f"Temperature T must be a finite number > 0, got {T!r}.")
    if weight == "logp_over_p" and label != "predicted":
        raise UvoodError("weight=logp_over_p is the importance-weighted row of Table 1, "
                         "E_{Y~p}[(log p(Y)/p(Y)) ||grad log p(Y)||]; use it with label=predicted.")
    if official and (label != "uniform" or weight != "none"):
        raise UvoodError("official=true reproduces the official GradNorm code (targets of ones, i.e. "
                         "label weights 1 instead of 1/C); use it with label=uniform and weight=none.")
    if bias and depth == "deep":
        raise UvoodError("bias=true selects the head's bias for depth=shallow; depth=deep always "
                         "differentiates every parameter with requires_grad (biases included). Drop bias=true.")


def label_coefficients(logits: torch.Tensor, label: str, weight: str = "none", T: float = 1.0,
                       official: bool = False) -> torch.Tensor:
    """c_k = q_k w_k (N x C, float64): 1/C (or 1 with official), p^(k), or log p^(k) (logp_over_p)."""
    z = logits.detach().to(torch.float64)
    if label == "uniform":
        return torch.full_like(z, 1.0 if official else 1.0 / z.shape[1])
    if weight == "logp_over_p":
        return torch.log_softmax(z / T, dim=1)  # p * (log p / p), without 0/0 when p underflows
    return softmax(z, T)


def _augmented_norm(h: torch.Tensor, norm: str, bias: bool) -> torch.Tensor:
    """U = ||h~||_1 or ||h~||_2^2 with h~ = [h, 1] when bias=true (float64)."""
    if norm == "l1":
        u = lp_norm(h, 1.0)
    else:
        u = lp_norm(h, 2.0) ** 2
    return u + 1.0 if bias else u


def grad_shallow(h: torch.Tensor, logits: torch.Tensor, *, label: str = "uniform", agg: str = "norm_of_mean",
                 norm: str = "l1", weight: str = "none", T: float = 1.0, bias: bool = False,
                 official: bool = False) -> torch.Tensor:
    """Unsigned shallow gradient norm in closed form (module docstring; Eq. 4, Eq. 5), float64.

    The gradient of log p^(k) w.r.t. the head [W b] is (e_k - p) h~^T / T, rank one, so
    ||.||_1 = ||e_k - p||_1 ||h~||_1 / T and ||.||_2^2 = ||e_k - p||_2^2 ||h~||_2^2 / T^2.
    """
    check_axes(label, agg, norm, weight, "shallow", T, bias, official)
    p = softmax(logits, T)
    c = label_coefficients(logits, label, weight, T, official)
    u = _augmented_norm(h, norm, bias)
    if agg == "norm_of_mean":
        m = (c - p * c.sum(dim=1, keepdim=True)) / T
        v = m.abs().sum(dim=1) if norm == "l1" else (m * m).sum(dim=1)
    elif norm == "l1":
        v = (2.0 / T) * (c * (1.0 - p)).sum(dim=1)
    else:
        sq = (p * p).sum(dim=1, keepdim=True)
        v = (c * (1.0 - 2.0 * p + sq)).sum(dim=1) / T**2
    return u * v


def gradnorm_shallow(h: torch.Tensor, logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Shallow GradNorm in closed form (Eq. 4): (1/T) * ||h||_1 * sum_k |1/C - p^(k)|.

    Equals || d KL(u || softmax(z/T)) / dW ||_1 for the last layer's weight W (Eq. 1-2).
    Sign +1: higher = more ID.
    """
    return grad_shallow(h, logits, label="uniform", agg="norm_of_mean", norm="l1", T=T)


def exgrad_shallow(h: torch.Tensor, logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Shallow ExGrad in closed form (Eq. 5, Appendix B), oriented higher = more ID.

    The expected gradient norm E_{Y~p}[||grad_W log p^(Y)||_1] = (2/T) ||h||_1 sum_k p^(k)(1-p^(k))
    is *larger* for uncertain inputs; uvood returns its negative (sign -1) so that higher = more ID.
    """
    return -grad_shallow(h, logits, label="predicted", agg="mean_of_norm", norm="l1", T=T)


def _logit_cotangents(label, agg, weight, T, official):
    """Cotangents at the logits for the engine: the expected one (norm_of_mean) or one per label."""

    def cot(z64: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(z64 / T, dim=1)
        if agg == "norm_of_mean":
            c = label_coefficients(z64, label, weight, T, official)
            return ((c - p * c.sum(dim=1, keepdim=True)) / T).unsqueeze(0)
        eye = torch.eye(z64.shape[1], dtype=torch.float64, device=z64.device)
        return (eye[:, None, :] - p[None]) / T  # K=C x n x C: (e_k - p) / T

    return cot


def deep_label_norms(model, x: torch.Tensor, *, T: float = 1.0, norms: tuple[str, ...] = ("l1", "l2sq"), head=None,
                     batch_size: int = DEEP_BATCH_SIZE) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-label, per-sample deep gradient norms ||grad_theta log p^(k)(x_n)||, C x N per norm, and
    the logits (N x C), from ONE engine pass for all the ``norms``.

    Every ``mean_of_norm`` deep score is a weighted sum of these over labels
    (:func:`mean_of_norm_from_label_norms`), so the benchmark computes them once per data set.
    """
    cot = _logit_cotangents("uniform", "mean_of_norm", "none", T, False)
    values, logits = per_sample_grad_norms(model, x, cot, norm=tuple(norms), head=head, batch_size=batch_size)
    return dict(zip(norms, values)), logits


def mean_of_norm_from_label_norms(label_norms: torch.Tensor, logits: torch.Tensor, *, label: str, weight: str = "none",
                                  T: float = 1.0, official: bool = False) -> torch.Tensor:
    """Unsigned raw = sum_k c_k ||grad log p^(k)|| from per-label norms (C x N), c_k of :func:`label_coefficients`."""
    c = label_coefficients(logits, label, weight, T, official)
    return (c.T * label_norms).sum(dim=0)


def grad_deep(model, x: torch.Tensor, *, label: str = "uniform", agg: str = "norm_of_mean", norm: str = "l1",
              weight: str = "none", T: float = 1.0, official: bool = False, head=None,
              batch_size: int = DEEP_BATCH_SIZE) -> torch.Tensor:
    """Unsigned deep gradient norm over every parameter with requires_grad (engine), float64.

    norm_of_mean: one backward with the cotangent sum_k c_k (e_k - p) / T = (c - p sum c) / T;
    mean_of_norm: the C cotangents (e_k - p) / T in one batched backward, then
    raw = sum_k c_k ||grad log p^(k)||. The model must be in eval mode (see the engine).
    """
    check_axes(label, agg, norm, weight, "deep", T, False, official)
    if label == "predicted" and agg == "norm_of_mean" and weight == "none":
        return torch.zeros(x.shape[0], dtype=torch.float64)  # the score-function identity (module docstring)
    norms, logits = per_sample_grad_norms(model, x, _logit_cotangents(label, agg, weight, T, official),
                                          norm=norm, head=head, batch_size=batch_size)
    if agg == "norm_of_mean":
        return norms[0]
    return mean_of_norm_from_label_norms(norms, logits, label=label, weight=weight, T=T, official=official)


def check_head_bias(score: Score, model, x: torch.Tensor, head=None) -> None:
    """Refuse ``bias=true`` on a model whose head has no bias (there is no b to differentiate)."""
    from ..model import find_head

    module = find_head(model, x[:1], head)
    if getattr(module, "bias", None) is None:
        raise UvoodError(f"Score {score.spec!r} differentiates the head's bias, but the head "
                         f"{type(module).__name__} has no bias. Drop bias=true.")


class GradScore(Score):
    """sign * || gradient || for one combination of axes (module docstring; Eq. 1-5)."""

    def __init__(self, label="uniform", agg="norm_of_mean", norm="l1", weight="none", depth="shallow",
                 T=1.0, bias=False, official=False):
        check_axes(label, agg, norm, weight, depth, T, bias, official)
        self.label, self.agg, self.norm, self.weight, self.depth = label, agg, norm, weight, depth
        self.T, self.bias, self.official = float(T), bool(bias), bool(official)
        self.sign = orientation(label, agg, weight)
        self.needs_model = depth == "deep"
        self.batch_size = DEEP_BATCH_SIZE
        if depth == "deep" and label == "predicted" and agg == "norm_of_mean" and weight == "none":
            self.config_version = 2  # now its closed form 0 (was a deep pass giving round-off): this row only

    def _axes(self):
        return dict(label=self.label, agg=self.agg, norm=self.norm, weight=self.weight, T=self.T,
                    official=self.official)

    def from_features(self, h, logits):
        if self.depth == "deep":
            return super().from_features(h, logits)  # raises: deep scores need the model
        return self.sign * grad_shallow(h, logits, bias=self.bias, **self._axes())

    def from_model(self, model, x, head=None):
        from ..model import eval_mode

        if self.depth == "shallow":
            if self.bias:
                check_head_bias(self, model, x, head)
            return super().from_model(model, x, head)
        with eval_mode(model):
            return self.sign * grad_deep(model, x, head=head, batch_size=self.batch_size, **self._axes())


# ---------------------------------------------------------------- BatchGrad (Eq. 6)


def augment(h: torch.Tensor, bias: bool) -> torch.Tensor:
    """h~ (N x D, float64, flattened): h, or [h, 1] when the head's bias is differentiated too."""
    hh = h.detach().to(torch.float64).reshape(h.shape[0], -1)
    return torch.cat([hh, hh.new_ones(hh.shape[0], 1)], dim=1) if bias else hh


def batchgrad_shallow(h: torch.Tensor, logits: torch.Tensor, anchor_grad: torch.Tensor, T: float = 1.0,
                      bias: bool = False) -> torch.Tensor:
    """Shallow BatchGrad (Eq. 6) on the head's weight W (and bias b with ``bias``), oriented
    higher = more ID (sign -1):

        -sum_k p^(k) || (e_k - p) h~^T / T + G ||_1,   G = sum_i grad_[W b] log p^(y_i)(x_i)

    with h~ = h, or [h, 1] with ``bias``, and G (C x D, or C x (D+1)) the anchor gradient of
    :meth:`BatchGradScore.fit`. The sum inside the norm is not rank one, so the C x D gradients
    are formed, in chunks.
    """
    p = softmax(logits, T)
    hh = augment(h, bias)
    G = anchor_grad.to(torch.float64)
    n, C = p.shape
    if G.shape != (C, hh.shape[1]):
        raise UvoodError(f"The BatchGrad anchor gradient is {tuple(G.shape)} but the features give "
                         f"C x D = {C} x {hh.shape[1]}" + (" (h augmented with a 1 for the bias)" if bias else "")
                         + ": fit the score on the same model, with the same bias setting.")
    eye = torch.eye(C, dtype=torch.float64, device=p.device)
    hh, G = hh.to(p.device), G.to(p.device)
    per = C * hh.shape[1]
    k_chunk = max(1, min(C, _CHUNK // per))
    n_chunk = max(1, _CHUNK // (per * k_chunk))
    out = torch.zeros(n, dtype=torch.float64, device=p.device)
    for lo in range(0, n, n_chunk):
        hi = min(n, lo + n_chunk)
        for k0 in range(0, C, k_chunk):
            k1 = min(C, k0 + k_chunk)
            v = (eye[None, k0:k1, :] - p[lo:hi, None, :]) / T  # n x k x C
            grads = v.unsqueeze(-1) * hh[lo:hi, None, None, :] + G  # n x k x C x D
            out[lo:hi] += (p[lo:hi, k0:k1] * grads.abs().sum(dim=(-1, -2))).sum(dim=1)
    return -out


class BatchGradScore(Score):
    """BatchGrad (Eq. 6), oriented higher = more ID:

        S_BG(x) = -E_{Y~p(x)} [ || grad_theta ( log p^(Y)(x) + sum_i log p^(y_i)(x_i) ) ||_1 ]

    with one ID training point (x_i, y_i) per class i, drawn by :meth:`fit`. The anchor gradient
    G = grad_theta sum_i log p^(y_i)(x_i) is a constant per model: computed once and added to
    every per-sample gradient. shallow: theta = the head's weight (with ``bias=true`` also its
    bias, as the authors' code does; closed form from (h, logits), G stored by fit); deep: every
    parameter with requires_grad (engine; G computed from the stored anchors the first time a
    model is scored, and again when its parameters change).
    """

    needs_fit = True

    def __init__(self, depth="shallow", T=1.0, seed=0, bias=False):
        check_axes("predicted", "mean_of_norm", "l1", "none", depth, T, bias, False)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UvoodError(f"batchgrad seed must be an integer >= 0, got {seed!r}.")
        self.depth, self.T, self.seed, self.bias = depth, float(T), seed, bool(bias)
        self.needs_model = depth == "deep"
        self.batch_size = DEEP_BATCH_SIZE
        self.anchor_x: torch.Tensor | None = None
        self.anchor_y: torch.Tensor | None = None
        self.anchor_grad: torch.Tensor | None = None
        self._cache: tuple | None = None

    def _anchor_indices(self, y: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
        y = torch.as_tensor(y).reshape(-1).long()
        state = np.random.SeedSequence([self.seed, int(seed)]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(state))
        idx = []
        missing = []
        for c in range(num_classes):
            where = torch.nonzero(y == c).reshape(-1)
            if where.numel() == 0:
                missing.append(c)
                continue
            idx.append(where[torch.randint(where.numel(), (1,), generator=gen)].item())
        if missing:
            raise UvoodError(f"BatchGrad needs one ID training point per class, but the labels have none of "
                             f"class(es) {missing[:10]} (the model has {num_classes} classes). Fit on data that "
                             "covers every class.")
        return torch.tensor(idx)

    def fit(self, model, x, y, head=None, seed=0):
        """Draw one ID point per class (seeded by the spec's seed and ``seed``) and store them."""
        from ..model import eval_mode, forward_features

        if y is None:
            raise UvoodError("BatchGrad needs labelled ID training data: fit(model, x, y) with y the class labels.")
        if len(y) != x.shape[0]:
            raise UvoodError(f"fit got {x.shape[0]} inputs but {len(y)} labels.")
        from ..devices import follow

        with torch.no_grad(), eval_mode(model):  # the probe follows the model's device and dtype
            _, z = forward_features(model, follow(x[:1], model), head)
        idx = self._anchor_indices(y, z.shape[1], seed)
        self.anchor_x = x[idx].detach().clone()
        self.anchor_y = torch.arange(z.shape[1])
        self._cache = None
        if self.depth == "shallow":
            if self.bias:
                check_head_bias(self, model, x, head)
            with torch.no_grad(), eval_mode(model):
                h, z = forward_features(model, follow(self.anchor_x, model), head)
            p = softmax(z, self.T)
            v = (torch.eye(z.shape[1], dtype=torch.float64, device=p.device)[self.anchor_y.to(p.device)] - p) / self.T
            self.anchor_grad = v.T @ augment(h, self.bias).to(p.device)

    def state(self):
        if self.anchor_x is None:
            return {}
        out = {"anchor_x": self.anchor_x, "anchor_y": self.anchor_y}
        if self.anchor_grad is not None:
            out["anchor_grad"] = self.anchor_grad
        return out

    def load_state(self, state):
        need = {"anchor_x", "anchor_y"} | ({"anchor_grad"} if self.depth == "shallow" else set())
        if not need <= set(state):
            raise UvoodError(f"Score {self.spec!r} needs the fitted tensors {sorted(need)}; the file holds "
                             f"{sorted(state)}. Fit the detector again.")
        self.anchor_x, self.anchor_y = state["anchor_x"], state["anchor_y"].long()
        self.anchor_grad = state.get("anchor_grad")
        self._cache = None

    def _check_fitted(self):
        if self.anchor_x is None:
            raise UvoodError(f"Score {self.spec!r} must be fitted on labelled ID data first "
                             "(Detector.fit, or score.fit(model, x, y)).")

    def from_features(self, h, logits):
        if self.depth == "deep":
            return super().from_features(h, logits)
        self._check_fitted()
        return batchgrad_shallow(h, logits, self.anchor_grad, self.T, self.bias)

    def _anchor_gradient(self, model, head, dtype, device):
        """G = grad_theta sum_i log p^(y_i)(x_i) over all parameters with requires_grad (cached)."""
        from ..model import forward_features

        params = [p for p in model.parameters() if p.requires_grad]
        key = (tuple(p._version for p in params), tuple(id(p) for p in params), dtype, device)
        if self._cache is not None and self._cache[0]() is model and self._cache[1] == key:
            return self._cache[2]
        with torch.enable_grad():
            _, z = forward_features(model, self.anchor_x.to(device=device, dtype=dtype), head)
            logp = torch.log_softmax(z / self.T, dim=1)
            loss = logp[torch.arange(z.shape[0], device=z.device), self.anchor_y.to(z.device)].sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        G = {id(p): (torch.zeros_like(p) if g is None else g.detach()) for p, g in zip(params, grads)}
        self._cache = (weakref.ref(model), key, G)
        return G

    def from_model(self, model, x, head=None):
        from ..model import eval_mode

        self._check_fitted()
        if self.depth == "shallow":
            if self.bias:
                check_head_bias(self, model, x, head)
            return super().from_model(model, x, head)
        T = self.T
        with eval_mode(model):
            from .engine import check_independent

            check_independent(model)
            G = self._anchor_gradient(model, head, x.dtype, x.device)
            norms, logits = per_sample_grad_norms(
                model, x, _logit_cotangents("predicted", "mean_of_norm", "none", T, False), norm="l1",
                head=head, offsets=G, batch_size=self.batch_size)
        p = softmax(logits, T)
        return -(p.T * norms).sum(dim=0)


# ---------------------------------------------------------------- registry

_AXES = {"label": "uniform", "agg": "norm_of_mean", "norm": "l1", "weight": "none", "depth": "shallow",
         "T": 1.0, "bias": False, "official": False}
_CHOICES = {"label": LABELS, "agg": AGGS, "norm": NORMS, "weight": WEIGHTS, "depth": DEPTHS,
            "bias": BOOLS, "official": BOOLS}

# the deep predicted-label norm-of-mean row has its own version 2 (GradScore.config_version): its closed form 0
register("grad", GradScore, params=dict(_AXES), kind="gradient", choices=dict(_CHOICES), doc=__doc__)


def _gradnorm(depth="shallow", T=1.0, bias=False, official=False):
    """GradNorm (Eq. 1-2; Huang et al. 2021) = grad(label=uniform, agg=norm_of_mean, norm=l1).

    || grad_theta E_{Y~U}[log p^(Y)] ||_1; shallow closed form (1/T) ||h||_1 sum_k |1/C - p^(k)|
    (Eq. 4). official=true: the official code's loss sum_k -log p^(k) (targets of ones), C times
    larger. Sign +1 (higher = more ID).
    """
    return GradScore("uniform", "norm_of_mean", "l1", "none", depth, T, bias, official)


def _exgrad(depth="shallow", T=1.0, bias=False):
    """ExGrad (Eq. 3) = grad(label=predicted, agg=mean_of_norm, norm=l1).

    E_{Y~p}[|| grad_theta log p^(Y) ||_1]; shallow closed form (2/T) ||h||_1 sum_k p^(k)(1 - p^(k))
    (Eq. 5). Larger for uncertain inputs: sign -1 (higher = more ID).
    """
    return GradScore("predicted", "mean_of_norm", "l1", "none", depth, T, bias, False)


register("gradnorm", _gradnorm, params={"depth": "shallow", "T": 1.0, "bias": False, "official": False},
         kind="gradient", doc=_gradnorm.__doc__, choices={"depth": DEPTHS, "bias": BOOLS, "official": BOOLS})
register("exgrad", _exgrad, params={"depth": "shallow", "T": 1.0, "bias": False}, kind="gradient",
         doc=_exgrad.__doc__, choices={"depth": DEPTHS, "bias": BOOLS})
register("batchgrad", BatchGradScore, params={"depth": "shallow", "T": 1.0, "seed": 0, "bias": False},
         kind="gradient", doc=BatchGradScore.__doc__, choices={"depth": DEPTHS, "bias": BOOLS})
