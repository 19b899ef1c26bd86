"""Gradient OOD detectors published since the paper, each with its head closed form as U * V.

Every score is oriented higher = more in-distribution; all values are float64. Notation as in
:mod:`uvood.scores.gradient`: h the head's input (N x D), z = W h + b the logits (N x C),
p = softmax(z / T), u = (1/C, ..., 1/C) the uniform distribution. The derivations are in
docs/gradient_scores.md, "Gradient methods since the paper"; the float64 per-sample autograd
references are in :mod:`uvood.scores.reference` (``reference_gaia``, ``reference_gradorth``,
``reference_lowdim``; the Fisher trace is ``reference_grad_score`` of its grad(...) axes).

* ``gaia(variant=a|z, layer=auto, target=authors)`` -- GAIA (Chen et al., NeurIPS 2023), as the authors'
  code (github.com/JGEthanChen/GAIA-OOD, ``cal_method.py``): gradients of the summed head input (A,
  normalised by an output term) or of the max logit (Z) w.r.t. the normalisation layers' outputs
  (deep only, needs the model); ``target=predicted|uniform``: the loss -log p^(yhat) or the KL to uniform.
* ``gaia_v`` -- GAIA-A at the head's input: -1 / mean_d |[W^T (1 - C p)]_d| * T, a pure output term (U = 1).
* ``gradorth(k=, energy=)`` -- GradOrth (Behpour et al., NeurIPS 2023), fitted on ID features;
  ``gradorth_u(k=, energy=) * gradorth_v`` is its U * V form (identical values at the head).
* ``lowdim(k, bias, depth)`` -- low-dimensional gradients (Wu et al., 2023, arXiv:2310.17163):
  the gradient of logsumexp(z) projected onto the top-k principal directions of the ID gradients,
  scored by a Mahalanobis distance there; shallow: the head, fitted on ID features (closed form);
  deep: every parameter, products J V and J^T W from the layer records (randomized SVD), no per-sample
  gradient of the whole model formed.
* ``fisher(depth, T, bias)`` -- the trace of the Fisher information of p(y|x) at x, shallow and
  deep; ``sqnorm * fisher_v`` is its U * V form (exact at the head).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UvoodError
from .engine import CHUNK_ELEMENTS, _slice
from .fitted import FittedScore, pinv_psd
from .gradient import BOOLS, DEPTHS, GradScore
from .output import softmax
from .registry import Score, register

#: samples per forward/backward micro-batch of GAIA: at most GAIA_BATCH_SIZE, and at most as many as keep the
#: activations autograd saves within GAIA_MEMORY bytes (about a last-level cache: on the benchmark's CNN, 1.1 MB
#: per sample, micro-batches of 26 instead of 128 ran GAIA-Z 1.3-1.4x faster on one CPU thread; the authors' batched
#: backward did not speed up with smaller batches). No effect on values.
GAIA_BATCH_SIZE = 128
GAIA_MEMORY = 2**25

#: at most this many ID samples span the low-dimensional gradient subspace (an n x n Gram matrix)
LOWDIM_FIT_MAX = 4096

#: at most this many ID samples span the deep subspace
LOWDIM_DEEP_FIT_MAX = 512

#: deep low-dim's micro-batch: at most this many samples, and at most this many bytes of recorded forward and
#: backward (larger micro-batches make the projections' matrix products more efficient: 20 % on the MLP)
LOWDIM_DEEP_BATCH = 512
LOWDIM_DEEP_MEMORY = 2**30


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).reshape(t.shape[0], -1)


def _check_T(T, name):
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not T > 0 or math.isinf(T):
        raise UvoodError(f"{name}: the temperature T must be a finite number > 0, got {T!r}.")
    return float(T)


def uniform_gap(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """p - u (N x C): T times the gradient at z of the KL-to-uniform loss -(1/C) sum_k log p^(k)."""
    p = softmax(logits, T)
    return p - 1.0 / p.shape[1]


def loss_cotangent(logits: torch.Tensor, target: str, T: float = 1.0) -> torch.Tensor:
    """dz-cotangent (N x C, float64) of the output GAIA differentiates: ``predicted``: L = -log p^(yhat),
    yhat = argmax_k z_k, dL/dz = (p - e_yhat)/T; ``uniform``: L = -(1/C) sum_k log p^(k), dL/dz = (p - u)/T;
    ``max_logit``: L = max_k z_k (the authors' GAIA-Z), dL/dz = e_yhat; ``logsoftmax_sum``: L = sum_k
    log p^(k) (the authors' output term of GAIA-A), dL/dz = (1 - C p)/T."""
    if target == "uniform":
        return uniform_gap(logits, T) / T
    if target == "logsoftmax_sum":
        return (1.0 - logits.shape[1] * softmax(logits, T)) / T
    onehot = torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(torch.float64)
    if target == "max_logit":
        return onehot
    return (softmax(logits, T) - onehot) / T


# ---------------------------------------------------------------- GAIA

#: GAIA's feature maps with ``layer=auto``: the outputs of the normalisation layers (the authors' hooks)
NORM_LAYERS = (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)


def _spatial(t: torch.Tensor) -> bool:
    """A feature map: N x channels x positions... with more than one position."""
    return t.ndim >= 3 and math.prod(t.shape[2:]) > 1


def gaia_layers(model: nn.Module, layer: str, head_module: nn.Module | None = None) -> tuple[list[nn.Module], bool]:
    """The modules whose outputs GAIA differentiates, and whether their outputs are spatial maps.

    ``auto``: every BatchNorm2d/3d and GroupNorm (the authors' hooks: ``get_bn_hooks``, and the normalisation
    layers of ``get_beforehead_hooks``); in a model without one, every convolution; in a model without
    convolutions (an MLP), every ``nn.Linear`` but the head, each hidden unit a channel with one position.
    ``NAME``: that module (names compared case-insensitively, as the spec grammar lower-cases them); its
    output must be a spatial map. ``head`` (the head's input h) is handled by the caller."""
    named = list(model.named_modules())
    if layer == "auto":
        for kinds in (NORM_LAYERS, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            chosen = [m for _, m in named if isinstance(m, kinds)]
            if chosen:
                return chosen, True
        hidden = [m for _, m in named if isinstance(m, nn.Linear) and m is not head_module]
        if not hidden:
            raise UvoodError(f"GAIA needs intermediate feature maps, but {type(model).__name__} has no convolution "
                             "and no hidden linear layer (no intermediate feature map). Score the head's input with "
                             "gaia(layer=head) or gaia_v.")
        return hidden, False
    chosen = [m for n, m in named if n and n.lower() == str(layer).lower()]
    if not chosen:
        names = [n for n, _ in named if n][:12]
        raise UvoodError(f"GAIA: the model has no layer named {layer!r}. Layers: {', '.join(names)}"
                         f"{' ...' if len(named) > 13 else ''}; or layer=auto (every normalisation layer), layer=head.")
    return chosen, True


class _Outputs:
    """Forward hooks that keep the chosen modules' outputs (or the head's input) of one forward.

    A kept output must be the module's own output when the backward reaches it. The model goes on with the
    very tensor (no copy) unless an operation after the module changes it in place (``ReLU(inplace=True)``,
    ResNet's ``out += identity``), which :meth:`modified` detects from the tensor's version counter after the
    forward; for those modules (``copy``: their ids) the caller runs the forward again and the model goes on
    with a copy, so that the kept map keeps its gradient w.r.t. the module's own output."""

    def __init__(self, modules: list[nn.Module], head_input: nn.Module | None = None, copy: frozenset = frozenset()):
        self.out: list[torch.Tensor] = []
        self.owners: list[nn.Module] = []
        self.versions: list[int] = []
        self.copy = copy
        self.handles = [m.register_forward_hook(self._keep) for m in modules]
        if head_input is not None:
            self.handles.append(head_input.register_forward_hook(lambda m, i, o: self.out.append(i[0])))

    def _keep(self, module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise UvoodError(f"GAIA: the layer {type(module).__name__} returns {type(output).__name__}, not a "
                             "tensor feature map; name another layer.")
        self.out.append(output)
        self.owners.append(module)
        self.versions.append(output._version)
        return output.clone() if id(module) in self.copy else None

    def modified(self) -> set[int]:
        """ids of the modules whose kept output was changed in place after the module (version counter)."""
        return {id(m) for m, t, v in zip(self.owners, self.out, self.versions) if t._version != v}

    def remove(self):
        for h in self.handles:
            h.remove()


def gaia_statistic(g: torch.Tensor, variant: str) -> torch.Tensor:
    """Per-channel abnormality of one layer's gradient map g (n x channels x positions...), n x channels:
    A: |mean over positions of g|; Z: the share of positions where g != 0 (float64)."""
    flat = g.detach().reshape(g.shape[0], g.shape[1], -1)
    if variant == "a":
        return flat.to(torch.float64).mean(-1).abs()
    if flat.shape[-1] >= 2**24:  # float32 counts are exact below 2^24
        return torch.count_nonzero(flat, dim=-1).to(torch.float64) / flat.shape[-1]
    nonzero = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    torch.ne(flat, 0, out=nonzero)  # 0/1 written as float32 directly: count_nonzero would copy a bool map to int64
    return nonzero.sum(-1).to(torch.float64) / flat.shape[-1]


def gaia_output_term(z: torch.Tensor, h: torch.Tensor, T: float) -> torch.Tensor:
    """o^2 = mean_c |dL/dh_c| (n, float64), L = sum_k log p^(k)(z / T): GAIA-A's normaliser (the authors'
    ``output_component`` squared), taken at the head's input h (the authors take the mean over positions of
    the gradient at the last map F before the global average pool, which is dL/dh / |positions|: a constant
    factor per model). One backward from the logits to h."""
    (gh,) = torch.autograd.grad(z, h, loss_cotangent(z, "logsoftmax_sum", T).to(z.dtype), retain_graph=True)
    return gh.detach().reshape(gh.shape[0], -1).to(torch.float64).abs().mean(1)


def gaia_micro_batch(model: nn.Module, x: torch.Tensor, head_module: nn.Module, batch_size: int) -> int:
    """Samples per micro-batch: at most ``batch_size``, at most GAIA_MEMORY bytes of saved activations (measured
    once per model and input shape on a probe of 2 samples, :func:`uvood.scores.engine._per_sample_bytes`), in
    micro-batches of equal size."""
    from .engine import _per_sample_bytes

    with torch.enable_grad():
        act = _per_sample_bytes(model, x, head_module, [])[0]
    n = max(1, min(batch_size, x.shape[0], int(GAIA_MEMORY // max(act, 1.0))))
    return math.ceil(x.shape[0] / math.ceil(x.shape[0] / n))


def gaia(model: nn.Module, x: torch.Tensor, *, variant: str = "a", layer: str = "auto", target: str = "authors",
         T: float = 1.0, head=None, batch_size: int = GAIA_BATCH_SIZE) -> torch.Tensor:
    """GAIA score -mean_{l,c} Lambda_{l,c}^2 (higher = more ID), one forward and ONE backward per micro-batch
    (two for GAIA-A with ``target=authors``: the output term, then the maps).

    Lambda_{l,c} = gaia_statistic of the gradient of an output y w.r.t. the map A_l, channel c (the mean over
    every channel of every chosen layer). ``target=authors`` (the authors' code, :class:`GaiaScore`):
    GAIA-A: y = sum_d h_d (the head's input summed) and Lambda divided by the output term o
    (:func:`gaia_output_term`); GAIA-Z: y = max_k z_k. ``predicted`` / ``uniform``: y = the loss of
    :func:`loss_cotangent`, no division. In eval mode the samples do not interact: the batch gradient of
    sum_n y_n w.r.t. A_l holds each sample's own gradient in its row, so one backward serves the batch.
    """
    from ..model import eval_mode, find_head, forward_head
    from .engine import check_independent

    if x.ndim == 0 or x.shape[0] == 0:
        raise UvoodError(f"x is empty (shape {tuple(x.shape)}): pass at least one sample.")
    feature_sum = target == "authors" and variant == "a"
    with eval_mode(model):
        check_independent(model)
        head_module = find_head(model, x[:1], head)
        chosen, spatial = ([], False) if layer == "head" else gaia_layers(model, layer, head_module)
        out, copy = [], frozenset()
        batch_size = gaia_micro_batch(model, x, head_module, batch_size)
        for lo in range(0, x.shape[0], batch_size):
            xb = x[lo:lo + batch_size].detach().clone().requires_grad_(True)
            while True:  # once; again with copies where a kept map was changed in place (_Outputs)
                tape = _Outputs(chosen, head_module if layer == "head" or feature_sum else None, copy)
                try:
                    with torch.enable_grad():
                        _, _, z = forward_head(model, xb, head_module)
                finally:
                    tape.remove()
                changed = tape.modified() - copy
                if not changed:
                    break
                copy = copy | changed
            maps = tape.out[:len(tape.out) - (feature_sum and layer != "head")]
            h = tape.out[-1]  # the head's input (when kept): what GAIA-A differentiates, and where o is taken
            if layer not in ("auto", "head") and not any(_spatial(a) for a in maps):
                raise UvoodError(f"GAIA: layer {layer!r} outputs shape {tuple(maps[0].shape)}, not a spatial "
                                 "feature map (N x channels x positions); name a convolutional layer, or use "
                                 "gaia(layer=head) for the head's input.")
            if spatial:  # a map that has shrunk to one position is left out, as in the reference
                maps = [a for a in maps if _spatial(a)]
            with torch.enable_grad():
                if feature_sum:
                    o2 = gaia_output_term(z, h, T)
                    grads = torch.autograd.grad(h, maps, torch.ones_like(h), allow_unused=True)
                else:
                    v = loss_cotangent(z, "max_logit" if target == "authors" else target, T).to(z.dtype)
                    grads = torch.autograd.grad(z, maps, v, allow_unused=True)
            sq = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
            channels = 0
            for a, g in zip(maps, grads):
                g = torch.zeros_like(a) if g is None else g
                if not spatial:
                    g = g.reshape(g.shape[0], -1, 1)
                sq += (gaia_statistic(g, variant) ** 2).sum(1)
                channels += g.shape[1]
            s = sq / max(channels, 1)
            out.append(-(s / o2.clamp_min(torch.finfo(torch.float64).tiny) if feature_sum else s))
    return torch.cat(out)


class GaiaScore(Score):
    """GAIA (Chen et al., "GAIA: Delving into Gradient-based Attribution Abnormality for
    Out-of-distribution Detection", NeurIPS 2023), oriented higher = more ID, as the authors' code
    (github.com/JGEthanChen/GAIA-OOD, ``cal_method.py``: ``cal_grad_value`` and ``cal_zero``; ``hook.py``;
    their ``cal_score`` negates the abnormality):

        S(x) = -(1 / |channels|) sum_{l,c} Lambda_{l,c}(x)^2

    over every channel c of every chosen map A_l (``layer=auto``: the outputs of every BatchNorm2d/3d and
    GroupNorm, the authors' hooks; without them every convolution; an MLP: every hidden ``nn.Linear``, each
    unit a channel with one position; ``layer=NAME``: one module with a spatial output; ``layer=head``: the
    head's input h).

    * GAIA-A (``variant=a``, channel-wise average abnormality, ``cal_grad_value``):
      Lambda_{l,c} = |mean over positions of d(sum_d h_d)/dA_{l,c}| / o, the attribution gradient of the
      head's input summed (their ``before_head_data``), normalised by the output term
      o = sqrt(mean_d |dL/dh_d|), L = sum_k log p^(k)(z / T) (their ``output_component``, taken at the last map
      before the global pool: a constant factor per model away from this, which does not change the ranking).
    * GAIA-Z (``variant=z``, zero-deflation abnormality, ``cal_zero``): Lambda_{l,c} = the share of positions
      where d(max_k z_k)/dA_{l,c} != 0.

    ``target=predicted`` / ``target=uniform`` (uvood's earlier choices, kept for comparison): the gradient
    of L = -log p^(yhat) (dL/dz = (p - e_yhat)/T) or of GradNorm's KL to the uniform ((p - u)/T) instead,
    with no normalisation. Deep only (needs the model; ``depth`` admits only ``deep``, so that the
    benchmark files it with the deep rows). At the head GAIA-A has the closed form ``gaia_v``. Where the
    authors' layer set is architecture-specific (GAIA-A: the normalisation layers of the last two stages of
    a ResNet; all of them for WRN-40-2 and VGG), uvood takes every normalisation layer.
    """

    needs_model = True

    def __init__(self, variant="a", layer="auto", target="authors", T=1.0, depth="deep"):
        self.variant, self.layer, self.T = variant, str(layer), _check_T(T, "gaia")
        self.target = target
        self.batch_size = GAIA_BATCH_SIZE

    def from_model(self, model, x, head=None):
        return gaia(model, x, variant=self.variant, layer=self.layer, target=self.target, T=self.T, head=head,
                    batch_size=self.batch_size)


class GaiaHeadScore(FittedScore):
    """GAIA-A at the head's input, closed form (a pure output term; U = 1), higher = more ID:

        target=authors:  S(x) = -1 / mean_d |[W^T (1 - C p)]_d / T|       (d(sum h)/dh = 1, so Lambda = 1 / o)
        target=predicted / uniform:  S(x) = -mean_d [W^T (p - e_yhat)]_d^2 / T^2   (or p - u)

    dL/dh = W^T dL/dz, one position per unit of h. "Fitting" only stores the head's weight W (C x D).
    Equals ``gaia(layer=head)`` with the same target.
    """

    needs_head = True
    _keys = ("weight",)
    method = "gaia_v"

    def __init__(self, target="authors", T=1.0):
        self.T, self.target = _check_T(T, "gaia_v"), target
        super().__init__()

    def _fit(self, h, logits, y, weight, bias):
        self.weight = weight.clone()

    def _score(self, h, logits):
        if self.target == "authors":
            o2 = (loss_cotangent(logits, "logsoftmax_sum", self.T) @ self.weight).abs().mean(1)
            return -1.0 / o2.clamp_min(torch.finfo(torch.float64).tiny)
        return -((loss_cotangent(logits, self.target, self.T) @ self.weight) ** 2).mean(1)


# ---------------------------------------------------------------- GradOrth


def _check_k(k, name):
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise UvoodError(f"{name}(k) needs an integer rank k >= 1, got {k!r}.")


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """How many singular values exceed max(s) * max(shape) * eps (numpy.linalg.matrix_rank's rule)."""
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0
    return int((s > s.max() * max(shape) * torch.finfo(s.dtype).eps).sum())


class GradOrthU(FittedScore):
    """GradOrth's U term: U(h) = || S_k^T h ||_2, the norm of h projected onto the ID subspace.

    S_k (D x k): the top-k right singular vectors of the n x D matrix of ID features (uncentred, as
    the representation matrix of GradOrth / GPM). ``k``: the rank; default (None): the smallest k
    with sum_{i<=k} s_i^2 >= ``energy`` * sum_i s_i^2 (the paper's threshold on the captured energy).
    A k larger than the numerical rank of the ID feature matrix is refused.
    """

    _keys = ("basis",)
    method = "GradOrth"

    def __init__(self, k=None, energy=0.97):
        _check_k(k, "gradorth")
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
            raise UvoodError(f"gradorth(energy) must be a share in (0, 1], got {energy!r}.")
        self.k, self.energy = k, float(energy)
        super().__init__()

    def _fit(self, h, logits, y, weight, bias):
        _, s, vh = torch.linalg.svd(h, full_matrices=False)
        rank = numerical_rank(s, tuple(h.shape))
        if self.k is not None:
            if self.k > rank:
                raise UvoodError(f"{self.method}: the projection rank k = {self.k} is larger than the fitted data "
                                 f"allows: the {h.shape[0]} x {h.shape[1]} ID feature matrix has rank {rank}. Use "
                                 f"k <= {rank}, or fit on more ID samples.")
            k = self.k
        else:
            share = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-300)
            k = min(int((share < self.energy - 1e-12).sum()) + 1, max(rank, 1))
        self.basis = vh[:k].T.contiguous()

    def _score(self, h, logits):
        if getattr(self, "_rows", (None,))[0] is not self.basis:  # S_k^T (k x D), contiguous: a faster product
            self._rows = (self.basis, self.basis.T.contiguous())
        return nn.functional.linear(h, self._rows[1]).norm(dim=1)


class GradOrthV(Score):
    """GradOrth's V term: V(p) = || p - u ||_2 / T (the l2 norm of the KL-to-uniform gradient at z)."""

    def __init__(self, T=1.0):
        self.T = _check_T(T, "gradorth_v")

    def from_features(self, h, logits):
        return uniform_gap(logits, self.T).norm(dim=1) / self.T


class GradOrthScore(GradOrthU):
    """GradOrth (Behpour et al., "GradOrth: A Simple yet Efficient Out-of-Distribution Detection
    with Orthogonal Projection of Gradients", NeurIPS 2023), oriented higher = more ID:

        S(x) = || grad_W L(x) S_k S_k^T ||_F,   L = -(1/C) sum_k log p^(k)  (KL(u || p) + const)

    the norm of the head-weight gradient projected onto the subspace of the ID representations
    (S_k as :class:`GradOrthU`). A small projection means OOD (the paper). Head closed form:
    grad_W L = (p - u) h^T / T is rank one, so the projection is (p - u)(S_k S_k^T h)^T / T and

        S(x) = ||p - u||_2 / T * ||S_k^T h||_2 = gradorth_v * gradorth_u        (exact)

    Assumptions: GradNorm's loss, the head's weight only (no bias), the Frobenius norm, default
    energy threshold 0.97 (the paper reports a threshold on the captured energy; its exact value
    per model was not available here). Head only: ``depth`` admits ``shallow`` alone.
    """

    def __init__(self, k=None, energy=0.97, T=1.0, depth="shallow"):
        super().__init__(k, energy)
        self.T = _check_T(T, "gradorth")

    def _score(self, h, logits):
        return super()._score(h, logits) * uniform_gap(logits, self.T).norm(dim=1) / self.T


# ---------------------------------------------------------------- low-dimensional gradients


def _augment(h: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1) if bias else h


class LowDimScore(FittedScore):
    """Low-dimensional gradients (Wu et al., "Low-Dimensional Gradient Helps Out-of-Distribution
    Detection", arXiv:2310.17163), at the head, oriented higher = more ID:

        g(x) = grad_[W(,b)] logsumexp(z) = p h~^T          (C x D, rank one; h~ = [h, 1] with bias)
        phi(x) = ( <g(x), M_j> )_{j=1..k} = ( p^T M_j h~ )_j
        S(x) = -(phi - mu)^T P (phi - mu)

    M_1..M_k: the top-k principal directions (uncentred, as the authors' truncated SVD of the ID
    gradient matrix) of the ID gradients g_i; mu, P = pinv(Sigma): mean and covariance of phi on
    the ID data. The full gradients are never formed: the Gram matrix of the ID gradients is
    K_ij = <g_i, g_j> = (p_i . p_j)(h~_i . h~_j) (at most ``LOWDIM_FIT_MAX`` ID samples, seeded),
    its top eigenpairs (a_j, s_j^2) give M_j = sum_i a_ij g_i / s_j (k x C x D stored), and
    phi costs k C D per sample. phi is a bilinear form p^T M_j h~, not a product U(h) V(p)
    (M_j is not rank one): this method has no U * V form.

    Assumptions: the authors' output is logsumexp(z) (their energy model), the detector in the
    subspace a single-Gaussian Mahalanobis distance (they pair the subspace with several existing
    detectors), the head only (their deep version projects all parameters' gradients). A k
    larger than the rank of the ID gradients is refused.
    """

    _keys = ("basis", "mu", "precision")
    method = "lowdim"

    def __init__(self, k=10, bias=False):
        _check_k(k, "lowdim")
        self.k, self.bias = k, bool(bias)
        super().__init__()

    def _fit(self, h, logits, y, weight, bias):
        hh, p = _augment(h, self.bias), softmax(logits)
        n = hh.shape[0]
        if n > LOWDIM_FIT_MAX:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:LOWDIM_FIT_MAX]
            hs, ps = hh[idx], p[idx]
        else:
            hs, ps = hh, p
        vals, vecs = torch.linalg.eigh((ps @ ps.T) * (hs @ hs.T))
        s = vals.clamp_min(0).flip(0).sqrt()
        rank = numerical_rank(s, (hs.shape[0], ps.shape[1] * hs.shape[1]))
        if self.k > rank:
            raise UvoodError(f"lowdim: the projection rank k = {self.k} is larger than the fitted data allows: the "
                             f"{hs.shape[0]} ID gradients span {rank} dimensions. Use k <= {rank}, or fit on more "
                             "ID samples.")
        a = vecs.flip(1)[:, :self.k] / s[:self.k]
        self.basis = torch.einsum("nk,nc,nd->kcd", a, ps, hs).contiguous()
        phi = self._project(hh, p)
        self.mu = phi.mean(0)
        centred = phi - self.mu
        self.precision = pinv_psd(centred.T @ centred / n)

    def _project(self, hh, p):
        """phi_j = p^T M_j h~ for every j: one (n x D) @ (D x kC) product, then a sum over classes with p."""
        k, c, d = self.basis.shape
        return (nn.functional.linear(hh, self.basis.reshape(k * c, d)).reshape(-1, k, c) * p[:, None, :]).sum(-1)

    def _score(self, h, logits):
        d = self._project(_augment(h, self.bias), softmax(logits)) - self.mu
        return -((d @ self.precision) * d).sum(1)


class _Logits(nn.Module):
    """The model's logits (via :func:`uvood.model.forward_head`) as a module whose parameters are the
    model's, so that ``torch.func.functional_call`` can swap them."""

    def __init__(self, model, head):
        super().__init__()
        self.model = model
        self._head = [head]  # in a list: not registered as a second owner of the head's parameters

    def forward(self, x):
        from ..model import forward_head

        return forward_head(self.model, x, self._head[0])[2]


# ---------------------------------------------------------------- projections J(x) V from the layer records

#: cost of one multiply-add of the per-sample convolution weight-gradient kernel (plus its projection) relative
#: to one of a batched convolution, for the cost model of :func:`conv_stacked_cheaper`; measured on CPU with
#: ``python benchmarks/since_speed.py --calibrate`` (one thread)
CONV_KERNEL_FACTOR = 3.0


def param_views(named, v: torch.Tensor) -> dict[int, torch.Tensor]:
    """{id(p): l x *p.shape}: the rows of ``v`` (P x l, parameters in the order of ``named``) of each
    parameter, as l tensors of its shape, in its dtype and device."""
    out, pos = {}, 0
    for _, p in named:
        out[id(p)] = v[pos:pos + p.numel()].T.reshape(-1, *p.shape).to(device=p.device, dtype=p.dtype)
        pos += p.numel()
    return out


def _project_linear(module, a, g, vs):
    """n x l: sum over positions of g^T V_j a (weight) + g . b_j (bias), y = a W^T + b.

    <g a^T, V_j> = g^T V_j a needs no per-sample gradient: one (rows x Din) @ (Din x l Cout) product (or the
    transposed order when Cout < Din: the smaller intermediate), then a batched dot product."""
    n = a.shape[0]
    a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    l = next(iter(vs.values())).shape[0]
    phi = g2.new_zeros(g2.shape[0], l)
    w = vs.get("weight")
    if w is not None:
        cout, din = w.shape[1:]
        step = max(1, CHUNK_ELEMENTS // (l * min(cout, din)))
        if din <= cout:  # (g V_j) . a
            m, left, right, width = w.transpose(0, 1).reshape(cout, l * din), g2, a2, din
        else:  # (V_j a) . g
            m, left, right, width = w.reshape(l * cout, din).T, a2, g2, cout
        for lo in range(0, left.shape[0], step):
            t = (left[lo:lo + step] @ m).view(-1, l, width)
            phi[lo:lo + step] += torch.bmm(t, right[lo:lo + step, :, None])[..., 0]
    if "bias" in vs:
        phi += g2 @ vs["bias"].T
    return phi.view(n, -1, l).sum(1)


def conv_stacked_cheaper(module, g, l: int) -> bool:
    """Cost model of a convolution's projection onto l directions, per sample, with T output positions,
    d = Cin/groups * kernel elements: materialising the per-sample weight gradient (the engine's kernel,
    Cout d T multiply-adds) and projecting it (l Cout d) against the layer input convolved with the l
    stacked filters (l Cout d T, one batched convolution). Stacked when l T < CONV_KERNEL_FACTOR (T + l),
    i.e. on late layers with few output positions."""
    T = math.prod(g.shape[2:])
    return l * T < CONV_KERNEL_FACTOR * (T + l)


def _project_conv_stacked(module, a, g, w):
    """n x l: sum_t <g_t, (a * V_j)_t>, the layer input convolved with the l filters V_j, dotted with g.

    2-D convolutions without groups: the input's patches (``F.unfold``, m T x d per chunk of m samples) times
    the l filters as one matrix (d x l Cout): ONE large matrix product (a convolution with few output positions
    runs far below a matrix product's speed: 2x on the benchmark CNN's last layer, T = 4), then per position a
    dot product with g. Otherwise the l filters stacked along the output channels (group-major, so that each
    group sees its own input channels) in one convolution."""
    from .engine import ConvRule

    l, cout = w.shape[:2]
    G = module.groups
    n, T = g.shape[0], math.prod(g.shape[2:])
    phi = g.new_empty(n, l)
    if isinstance(module, nn.Conv2d) and G == 1:
        a, padding = ConvRule._padded(module, a)
        vm = w.reshape(l * cout, -1).T  # d x l Cout
        step = max(1, CHUNK_ELEMENTS // (T * (l * cout + vm.shape[0])))
        for lo in range(0, n, step):
            u = nn.functional.unfold(a[lo:lo + step], module.kernel_size, module.dilation, padding, module.stride)
            m = u.shape[0]
            z = (u.transpose(1, 2).reshape(m * T, -1) @ vm).view(m * T, l, cout)
            gt = g[lo:lo + step].reshape(m, cout, T).transpose(1, 2).reshape(m * T, cout, 1)
            phi[lo:lo + step] = torch.bmm(z, gt).view(m, T, l).sum(1)
        return phi
    ws = w.reshape(l, G, cout // G, *w.shape[2:]).transpose(0, 1).reshape(G * l * (cout // G), *w.shape[2:])
    step = max(1, CHUNK_ELEMENTS // (l * cout * T))
    for lo in range(0, n, step):
        y = module._conv_forward(a[lo:lo + step], ws, None).reshape(-1, G, l, cout // G, T)
        gg = g[lo:lo + step].reshape(-1, G, 1, cout // G, T)
        phi[lo:lo + step] = (y * gg).sum((1, 3, 4))
    return phi


def _project_materialised(r, g, vs):
    """n x l from the per-sample gradients of the record's rule (``grad_sample``: the convolution's per-sample
    kernel, BatchNorm's closed form, torch.func for other modules), formed in chunks of samples and projected
    with one (m x P_layer) @ (P_layer x l) product per parameter."""
    n = g.shape[0]
    names = list(vs)
    per_sample = sum(vs[nm][0].numel() for nm in names) + r.rule.sample_elements(r.module, r.inputs, names)
    step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
    l = vs[names[0]].shape[0]
    phi = g.new_zeros(n, l)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        gs = r.rule.grad_sample(r.module, _slice(r.inputs, lo, hi, n), r.kwargs, g[None, lo:hi], names)
        for nm in names:
            phi[lo:hi] += gs[nm][0].reshape(hi - lo, -1) @ vs[nm].reshape(l, -1).T
    return phi


#: elements of the buffer that holds a few samples' convolution weight gradients between the kernel and their
#: projection (:func:`_project_conv_kernel`): reused, so that it stays in cache (4 MiB of float32)
PROJECT_BUFFER_ELEMENTS = 2**20


def _project_conv_kernel(module, a, g, w):
    """n x l: <per-sample weight gradient, V_j> for a convolution, the gradient of each sample from the engine's
    weight-gradient kernel (:meth:`uvood.scores.engine.ConvRule._per_sample_weight_grads`, C_out d T multiply-adds)
    written into a buffer of m samples (PROJECT_BUFFER_ELEMENTS, reused: no fresh m x P allocation per chunk),
    then projected by one (l x P) @ (P x m) product (l C_out d per sample)."""
    from .engine import ConvRule

    n, l = g.shape[0], w.shape[0]
    vf = w.reshape(l, -1)
    step = max(1, min(n, PROJECT_BUFFER_ELEMENTS // vf.shape[1]))
    buf = g.new_empty(step, vf.shape[1])
    phi = g.new_empty(n, l)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        for i, gw in ConvRule._per_sample_weight_grads(module, a[lo:hi], g[None, lo:hi]):
            buf[i] = gw.reshape(-1)  # one cotangent: the group-major order is the weight's own
        phi[lo:hi] = (vf @ buf[:hi - lo].T).T
    return phi


def project_record(r, g: torch.Tensor, vs: dict[str, torch.Tensor]) -> torch.Tensor:
    """n x l: phi_j = <per-sample gradient of the record's parameters ``vs`` (name -> l x shape), V_j>, from
    its input and its output gradient g (n x output shape), by the cheapest exact rule: linear layers by
    g^T V_j a, convolutions by the cost model :func:`conv_stacked_cheaper`, their bias from g directly,
    anything else by materialised per-sample gradients (:func:`_project_materialised`)."""
    from .engine import ConvRule, LinearRule

    if isinstance(r.rule, LinearRule):
        return _project_linear(r.module, r.inputs[0], g, vs)
    if isinstance(r.rule, ConvRule) and "weight" in vs:
        if conv_stacked_cheaper(r.module, g, vs["weight"].shape[0]):
            phi = _project_conv_stacked(r.module, r.inputs[0], g, vs["weight"])
        else:
            phi = _project_conv_kernel(r.module, r.inputs[0], g, vs["weight"])
        if "bias" in vs:
            phi += g.reshape(g.shape[0], g.shape[1], -1).sum(-1) @ vs["bias"].T
        return phi
    return _project_materialised(r, g, vs)


def _jvp_projection(model, x, named, views, head, batch_size):
    """J(x) V (n x l, float64) restricted to the parameters ``named``: one vmapped forward-mode jvp per
    micro-batch (one jvp per direction where an operation has no batching rule)."""
    from torch.func import functional_call, jvp, vmap

    wrapper = _Logits(model, head)
    primals = {f"model.{n}": p.detach() for n, p in named}
    stacked = {f"model.{n}": views[id(p)] for n, p in named}
    l = next(iter(stacked.values())).shape[0]
    out = torch.zeros(x.shape[0], l, dtype=torch.float64)
    for lo in range(0, x.shape[0], batch_size):
        xb = x[lo:lo + batch_size]

        def y(prm, xb=xb):
            return torch.logsumexp(functional_call(wrapper, prm, (xb,)), dim=1)

        def tangent_out(t, y=y):
            return jvp(y, (primals,), (t,))[1].detach()  # the other parameters are the model's own

        try:  # all l directions in one vmapped jvp (the primal is computed once)
            out[lo:lo + xb.shape[0]] = vmap(tangent_out)(stacked).T.double().cpu()
        except RuntimeError:  # an operation without a batching rule: one jvp per direction
            for j in range(l):
                out[lo:lo + xb.shape[0], j] = tangent_out({k: t[j] for k, t in stacked.items()}).double().cpu()
    return out


def _record_passes(model, x, named, head, batch_size, plan: dict):
    """Per micro-batch: (lo, [(record, output gradient, {name: parameter} it covers)]), from ONE forward with
    the layers recorded and ONE backward of sum_n logsumexp(z_n) to the recorded outputs (cotangent softmax(z)
    at the logits; in eval mode the samples do not interact, so row n of each output gradient is sample n's
    own). The coverage check (:func:`uvood.scores.engine.uncovered_params`) runs on the first micro-batch;
    ``plan["skip"]``: the ids of the parameters it finds uncovered."""
    from .engine import record_forward, uncovered_params

    selected = {id(p): p for _, p in named}
    modules = [m for m in model.modules() if any(id(p) in selected for p in m.parameters(recurse=False))]
    if x.is_inference():
        x = x.clone()
    for lo in range(0, x.shape[0], batch_size):
        with torch.enable_grad():
            _, logits, records = record_forward(model, x[lo:lo + batch_size], head, modules)
            if "skip" not in plan:
                plan["skip"] = uncovered_params(logits, records, selected)
            skip = plan["skip"]
            grads = torch.autograd.grad(logits, [r.output for r in records], torch.softmax(logits.detach(), 1),
                                        allow_unused=True) if records else []
        items = []
        for r, g in zip(records, grads):
            own = {nm: p for nm, p in r.params.items() if id(p) in selected and id(p) not in skip}
            if g is not None and own:
                items.append((r, g.detach(), own))
        yield lo, items


def project_gradients(model, x, v: torch.Tensor, head, named, batch_size: int = 128, views=None) -> torch.Tensor:
    """phi = J(x) V (N x l, float64): phi[n, j] = <grad_theta logsumexp(z(x_n)), v_j>, theta = ``named``.

    Per micro-batch one forward and one backward (:func:`_record_passes`), then each record's share of phi
    from its input a and output gradient g (:func:`project_record`); no full per-sample gradient is formed.
    Parameters the records do not cover (tied weights, weights used outside their module's forward) are
    projected by forward-mode jvp (:func:`_jvp_projection`). ``views``: :func:`param_views` of v, if at hand."""
    views = param_views(named, v) if views is None else views
    out = torch.zeros(x.shape[0], v.shape[1], dtype=torch.float64)
    plan: dict = {}
    for lo, items in _record_passes(model, x, named, head, batch_size, plan):
        with torch.no_grad():
            acc = None
            for r, g, own in items:
                part = project_record(r, g, {nm: views[id(p)] for nm, p in own.items()})
                acc = part if acc is None else acc + part
            if acc is not None:
                out[lo:lo + acc.shape[0]] = acc.double().cpu()
    if plan.get("skip"):
        out += _jvp_projection(model, x, [(nm, p) for nm, p in named if id(p) in plan["skip"]], views, head,
                               batch_size)
    return out


def _vjp_linear(a, g, w, names):
    """{name: l x shape}: sum_n w_nj g_n a_n^T (summed over positions) and sum_n w_nj g_n, y = a W^T + b."""
    n, l = a.shape[0], w.shape[1]
    a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    wr = w.repeat_interleave(a2.shape[0] // n, dim=0)
    out = {}
    if "weight" in names:
        cout = g2.shape[1]
        acc = g2.new_zeros(l * cout, a2.shape[1])
        step = max(1, CHUNK_ELEMENTS // (l * cout))
        for lo in range(0, a2.shape[0], step):
            gw = (wr[lo:lo + step, :, None] * g2[lo:lo + step, None, :]).reshape(-1, l * cout)
            acc += gw.T @ a2[lo:lo + step]
        out["weight"] = acc.view(l, cout, a2.shape[1])
    if "bias" in names:
        out["bias"] = wr.T @ g2
    return out


def _vjp_conv_weight(module, a, g, w):
    """l x weight shape: sum_n w_nj (per-sample weight gradient of sample n), from ONE call of the convolution's
    weight-gradient kernel per chunk of samples, the l weighted copies of g stacked along the output channels
    (group-major; the gradient w.r.t. l stacked copies of the filters holds each column's sum)."""
    from .engine import ConvRule

    a, padding = ConvRule._padded(module, a)
    shape, G, l = module.weight.shape, module.groups, w.shape[1]
    n, cout, spatial = g.shape[0], g.shape[1], g.shape[2:]
    proxy = module.weight.detach().repeat(l, *([1] * (len(shape) - 1)))  # l*Cout x Cin/G x kernel (shape only)
    acc = None
    step = max(1, CHUNK_ELEMENTS // (l * g[0].numel()))
    for lo in range(0, n, step):
        gg = w[lo:lo + step, :, None, None, None] * g[lo:lo + step].reshape(-1, 1, G, cout // G, math.prod(spatial))
        gg = gg.transpose(1, 2).reshape(gg.shape[0], G * l * (cout // G), *spatial)
        _, gw, _ = torch.ops.aten.convolution_backward(
            gg, a[lo:lo + step], proxy, None, list(module.stride), padding, list(module.dilation), False,
            [0] * len(spatial), G, [False, True, False])
        acc = gw if acc is None else acc + gw
    return acc.view(G, l, cout // G, *shape[1:]).transpose(0, 1).reshape(l, *shape)


def vjp_record(r, g: torch.Tensor, w: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """{name: l x param shape}: sum_n w_nj (per-sample gradient of sample n) for each column j of w (n x l), from
    the record's input and output gradient g: linear layers by one (l Cout x rows) @ (rows x Din) product,
    convolutions by one stacked kernel call per chunk where the cost model :func:`conv_stacked_cheaper` says so
    (its l-fold kernel against the per-sample kernel plus a contraction: the same arithmetic as the projection's),
    biases from g, anything else by materialised per-sample gradients (``grad_sample``) contracted with w."""
    from .engine import ConvRule, LinearRule

    if isinstance(r.rule, LinearRule):
        return _vjp_linear(r.inputs[0], g, w, names)
    out = {}
    if isinstance(r.rule, ConvRule) and (
            "weight" not in names or conv_stacked_cheaper(r.module, g, w.shape[1])):  # else materialised, below
        if "weight" in names:
            out["weight"] = _vjp_conv_weight(r.module, r.inputs[0], g, w)
        if "bias" in names:
            out["bias"] = w.T @ g.reshape(g.shape[0], g.shape[1], -1).sum(-1)
        return out
    n = g.shape[0]
    per_sample = sum(getattr(r.module, nm).numel() for nm in names) + r.rule.sample_elements(r.module, r.inputs,
                                                                                               names)
    step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        gs = r.rule.grad_sample(r.module, _slice(r.inputs, lo, hi, n), r.kwargs, g[None, lo:hi], list(names))
        for nm in names:
            part = torch.tensordot(w[lo:hi].T, gs[nm][0], dims=1)
            out[nm] = part if nm not in out else out[nm] + part
    return out


def backproject_gradients(model, x, w: torch.Tensor, head, named, batch_size: int = 128) -> torch.Tensor:
    """J^T W (P x l, float64) for W (N x l): column j = sum_n w_nj grad_theta logsumexp(z(x_n)), theta = ``named``
    (rows in its order). Per micro-batch one forward and one backward (:func:`_record_passes`), then each
    record's share (:func:`vjp_record`); the parameters the records do not cover by one autograd backward of
    sum_n w_nj y_n per column."""
    from ..model import forward_head

    offsets, pos = {}, 0
    for _, p in named:
        offsets[id(p)] = pos
        pos += p.numel()
    out = torch.zeros(pos, w.shape[1], dtype=torch.float64)
    plan: dict = {}
    for lo, items in _record_passes(model, x, named, head, batch_size, plan):
        with torch.no_grad():
            for r, g, own in items:
                wb = w[lo:lo + g.shape[0]].to(device=g.device, dtype=g.dtype)
                for nm, part in vjp_record(r, g, wb, list(own)).items():
                    p = own[nm]
                    out[offsets[id(p)]:offsets[id(p)] + p.numel()] += part.reshape(w.shape[1], -1).T.double().cpu()
    rest = [p for _, p in named if id(p) in plan.get("skip", ())]
    for lo in range(0, x.shape[0] if rest else 0, batch_size):
        with torch.enable_grad():
            y = torch.logsumexp(forward_head(model, x[lo:lo + batch_size], head)[2], dim=1)
            for j in range(w.shape[1]):
                grads = torch.autograd.grad(y, rest, w[lo:lo + len(y), j].to(device=y.device, dtype=y.dtype),
                                            retain_graph=j < w.shape[1] - 1, allow_unused=True)
                for p, g in zip(rest, grads):
                    if g is not None:
                        out[offsets[id(p)]:offsets[id(p)] + p.numel(), j] += g.reshape(-1).double().cpu()
    return out


class LowDimDeepScore(Score):
    """Low-dimensional gradients over every parameter (Wu et al., arXiv:2310.17163), higher = more ID:

        phi_j(x) = <grad_theta logsumexp(z(x)), v_j>,   S(x) = -(phi - mu)^T P (phi - mu)

    v_1..v_k: the top-k right singular vectors of the ID Jacobian J (n x P, row i = the gradient of
    logsumexp(z(x_i)) w.r.t. all parameters with requires_grad), found as the authors do, by a randomized
    truncated SVD that touches J only through products J^T W (:func:`backproject_gradients`) and J V
    (:func:`project_gradients`), each from ONE forward and ONE backward per micro-batch with the layers
    recorded (exact per sample: the samples do not interact in eval mode). Rows of J are never formed;
    memory is P x (k + oversample). Scoring: phi(x) = J(x) V, the same projection. mu, P = pinv(Sigma) of
    phi on the fit samples. The subspace is exact when k + ``oversample`` >= the rank of J (at most the
    number of fit samples), else the randomized estimate with ``iters`` power iterations (seeded). At most
    ``LOWDIM_DEEP_FIT_MAX`` = 512 ID samples (seeded subset) span the subspace.
    """

    needs_model = True
    needs_fit = True

    def __init__(self, k=10, oversample=10, iters=1):
        self.k, self.oversample, self.iters = k, int(oversample), int(iters)
        self.basis = self.mu = self.precision = self._views = None
        self.batch_size = None  # None: planned from LOWDIM_DEEP_MEMORY (:meth:`_micro_batch`)

    @staticmethod
    def _params(model):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def _jt(self, model, x, w, head):
        """J^T w (P x l, float64) for w (n x l): :func:`backproject_gradients` (one forward and backward per
        micro-batch, the weighted sums of per-sample gradients from the layer records)."""
        return backproject_gradients(model, x, w, head, self._params(model), self._micro_batch(model, x, head))

    def _j(self, model, x, v, head, views=None):
        """J v (n x l, float64) for v (P x l): :func:`project_gradients` (one forward and backward per
        micro-batch, the projection from the layer records)."""
        return project_gradients(model, x, v, head, self._params(model), self._micro_batch(model, x, head), views)

    def _basis_views(self, named):
        """:func:`param_views` of the basis (l x each parameter's shape, in its dtype and device), kept between
        calls: the scoring projection reads the same basis for every batch."""
        key = tuple((tuple(p.shape), p.dtype, p.device) for _, p in named)
        if self._views is None or self._views[0] != key:
            self._views = (key, param_views(named, self.basis.T))
        return self._views[1]

    def _micro_batch(self, model, x, head) -> int:
        """``batch_size`` if set, else the most samples (at most ``LOWDIM_DEEP_BATCH``) whose recorded forward and
        backward fit ``LOWDIM_DEEP_MEMORY`` bytes, measured on a probe of 2 samples
        (:func:`uvood.scores.engine.plan_micro_batch`, one cotangent row)."""
        if self.batch_size is not None:
            return self.batch_size
        from .engine import Reduction, RowGroup, plan_micro_batch

        ids = {id(p) for _, p in self._params(model)}
        modules = [m for m in model.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]
        group = RowGroup(lambda z: torch.softmax(z, 1)[None], (Reduction("l2sq"),))
        with torch.enable_grad():
            return plan_micro_batch(model, x, [group], head, modules, LOWDIM_DEEP_BATCH, LOWDIM_DEEP_MEMORY)[0]

    def fit(self, model, x, y, head=None, seed=0):
        from ..model import eval_mode, find_head
        from .engine import check_independent

        with eval_mode(model):
            check_independent(model)
            head = find_head(model, x[:1], head)
            n = x.shape[0]
            if n > LOWDIM_DEEP_FIT_MAX:
                idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:LOWDIM_DEEP_FIT_MAX]
                x, n = x[idx], LOWDIM_DEEP_FIT_MAX
            gen = torch.Generator().manual_seed(int(seed))
            l_cols = min(n, self.k + self.oversample)
            start = torch.randn(n, l_cols, generator=gen, dtype=torch.float64)  # on the CPU: the same on any device
            big = self._jt(model, x, start.to(x.device), head)
            for _ in range(self.iters):
                small = self._j(model, x, torch.linalg.qr(big).Q, head)
                big = self._jt(model, x, torch.linalg.qr(small).Q, head)
            q = torch.linalg.qr(big).Q
            b = self._j(model, x, q, head)
            _, s, wt = torch.linalg.svd(b, full_matrices=False)
        rank = numerical_rank(s, (n, q.shape[0]))
        if self.k > rank:
            raise UvoodError(f"lowdim: the projection rank k = {self.k} is larger than the fitted data allows: the "
                             f"{n} ID gradients span {rank} dimensions. Use k <= {rank}, or fit on more ID samples.")
        self.basis, self._views = (q @ wt[:self.k].T).T.contiguous(), None
        phi = b @ wt[:self.k].T
        self.mu = phi.mean(0)
        centred = phi - self.mu
        self.precision = pinv_psd(centred.T @ centred / n)

    def from_model(self, model, x, head=None):
        from ..model import eval_mode, find_head
        from .engine import check_independent

        if self.basis is None:
            raise UvoodError(f"Score {self.spec!r} must be fitted on ID training data first: "
                             "uvood.Detector(model, score=...).fit(id_data), or score.fit(model, x, y).")
        with eval_mode(model):
            check_independent(model)
            n_params = sum(p.numel() for _, p in self._params(model))
            if n_params != self.basis.shape[1]:
                raise UvoodError(f"Score {self.spec!r} was fitted on a model with {self.basis.shape[1]} parameters, "
                                 f"but this one has {n_params}: fit it again.")
            named = self._params(model)
            d = self._j(model, x, self.basis.T, find_head(model, x[:1], head), self._basis_views(named)) - self.mu
        return (-((d @ self.precision) * d).sum(1)).to(x.device)

    def state(self):
        return {} if self.basis is None else {"basis": self.basis, "mu": self.mu, "precision": self.precision}

    def load_state(self, state):
        if set(state) != {"basis", "mu", "precision"}:
            raise UvoodError(f"Score {self.spec!r} needs the fitted tensors ['basis', 'mu', 'precision']; the file "
                             f"holds {sorted(state)}. Fit the detector again.")
        self.basis, self.mu, self.precision = (state[k].to(torch.float64) for k in ("basis", "mu", "precision"))
        self._views = None


def _lowdim(k=10, bias=False, depth="shallow"):
    """Low-dimensional gradients: ``depth=shallow`` the head closed form (:class:`LowDimScore`),
    ``depth=deep`` every parameter (:class:`LowDimDeepScore`, no ``bias`` option: it has them all)."""
    _check_k(k, "lowdim")
    if depth == "deep":
        if bias:
            raise UvoodError("lowdim(depth=deep) differentiates every parameter, biases included: drop bias=true.")
        return LowDimDeepScore(k)
    return LowDimScore(k, bias)


# ---------------------------------------------------------------- Fisher-information trace


def _fisher(depth="shallow", T=1.0, bias=False):
    """Trace of the Fisher information of p(y | x) at x, oriented higher = more ID (sign -1):

        tr F(x) = E_{Y~p}[ || grad_theta log p^(Y)(x) ||_2^2 ]  = grad(label=predicted, agg=mean_of_norm, norm=l2sq)

    shallow: theta = the head's weight (and bias with ``bias=true``); closed form
    (1/T^2) ||h~||_2^2 (1 - ||p||_2^2) = sqnorm * fisher_v (U * V, exact); deep: every parameter
    (engine). The trace is larger for uncertain inputs, hence the sign -1.
    """
    return GradScore("predicted", "mean_of_norm", "l2sq", "none", depth, T, bias, False)


class SqNormScore(Score):
    """U(h) = ||h||_2^2 (the Fisher trace's encoding term)."""

    def from_features(self, h, logits):
        return (_f64(h) ** 2).sum(1)


class FisherVScore(Score):
    """V(p) = -(1 - ||p||_2^2) / T^2 <= 0 (the Fisher trace's output term, with its sign -1).

    A product ``sqnorm * fisher_v`` = -||h||^2 (1 - ||p||^2) / T^2 = ``fisher`` (weight only)."""

    def __init__(self, T=1.0):
        self.T = _check_T(T, "fisher_v")

    def from_features(self, h, logits):
        p = softmax(logits, self.T)
        return -(1.0 - (p * p).sum(1)) / self.T**2


# ---------------------------------------------------------------- registry

VARIANTS = ("a", "z")

TARGETS = ("authors", "predicted", "uniform")

register("gaia", GaiaScore, params={"variant": "a", "layer": "auto", "target": "authors", "T": 1.0, "depth": "deep"},
         kind="gradient", choices={"variant": VARIANTS, "target": TARGETS, "depth": ("deep",)}, doc=GaiaScore.__doc__,
         version=2)
register("gaia_v", GaiaHeadScore, params={"target": "authors", "T": 1.0}, kind="output", choices={"target": TARGETS},
         doc=GaiaHeadScore.__doc__, version=2)
register("gradorth", GradOrthScore, params={"k": None, "energy": 0.97, "T": 1.0, "depth": "shallow"},
         kind="gradient", choices={"depth": ("shallow",)}, doc=GradOrthScore.__doc__)
register("gradorth_u", GradOrthU, params={"k": None, "energy": 0.97}, kind="encoding", doc=GradOrthU.__doc__)
register("gradorth_v", GradOrthV, params={"T": 1.0}, kind="output", doc=GradOrthV.__doc__)
register("lowdim", _lowdim, params={"k": 10, "bias": False, "depth": "shallow"}, positional=("k",),
         kind="gradient", choices={"bias": BOOLS, "depth": DEPTHS}, doc=LowDimScore.__doc__ + LowDimDeepScore.__doc__)
register("fisher", _fisher, params={"depth": "shallow", "T": 1.0, "bias": False}, kind="gradient",
         choices={"depth": DEPTHS, "bias": BOOLS}, doc=_fisher.__doc__)
register("sqnorm", SqNormScore, kind="encoding", doc=SqNormScore.__doc__)
register("fisher_v", FisherVScore, params={"T": 1.0}, kind="output", doc=FisherVScore.__doc__)
