"""The deep gradient engine: per-sample gradient norms from ONE batched forward and backward.

For a batch x_1..x_N and K cotangents v_{k,n} at the logits z_n, the engine returns

    norms[k, n] = || d <v_{k,n}, z_n> / d theta ||        (l1, or squared l2 "l2sq")

over the chosen parameters theta (default: every parameter with ``requires_grad``), i.e. the
norm of the gradient of sample n alone. With v_{k,n} = (e_k - p_n) / T this is
|| grad_theta log softmax(z_n / T)_k || (Appendix B: d log p^(k) / dz = (e_k - p) / T), and
with v_n = sum_k c_k (e_k - p_n) / T it is the norm of the gradient of an expectation
(GradNorm, Eq. 2). :mod:`uvood.scores.gradient` builds the scores of Table 1 on top of this.

How (Opacus / BackPACK style)
-----------------------------
1. Forward hooks on every module that owns selected parameters record its inputs ``a`` and
   its output; the forward runs once on the micro-batch.
2. ``torch.autograd.grad`` from the logits to the recorded outputs gives every layer's output
   gradient ``g`` (K x N x ...) for the K cotangents: one backward through the same graph per
   cotangent (or one vmapped backward, ``is_grads_batched``, with ``BATCHED_BACKWARD = True``;
   slower on CPU where BatchNorm and max-pool backward have no batching rule), written into one
   preallocated sample-major buffer per layer, in chunks of at most ``max_rows`` (sample,
   cotangent) rows. No parameter ``.grad`` is computed or touched. The micro-batch and the rows
   per chunk come from a memory budget (:func:`plan_micro_batch`, ``max_memory``).

   Several row groups (:class:`RowGroup`: e.g. the C label cotangents and GradNorm's combined
   one) share the forward of a micro-batch (:func:`per_sample_grad_reductions`); each group asks
   for several reductions (:class:`Reduction`: l1 or l2sq, optionally of the gradient plus a
   constant offset), all computed from the same output gradients (:mod:`uvood.scores.fused`).
3. A table of per-layer rules, registered by module type with :func:`register_rule`, turns
   (a, g) into per-sample quantities:

   * ``nn.Linear`` with a 2-D input: the per-sample weight gradient g a^T is rank one, so
     ||g a^T||_1 = ||g||_1 ||a||_1 and ||g a^T||_2^2 = ||g||_2^2 ||a||_2^2 without forming it;
     with extra input dimensions the per-sample gradient is formed (sum over positions);
     bias: g (summed over positions).
   * ``nn.Conv1d/2d/3d``: per-sample weight gradient (= g_n @ unfold(a_n)^T) from the
     convolution's own weight-gradient kernel, one call per sample for all K cotangents
     (stacked along the output channels); the norms path holds one sample's gradient at a
     time, the materialising path works in chunks of samples. The l1 norm of a sum over
     positions is not separable, so no shortcut exists; where a sample's K x Cout x d gradient
     exceeds BLOCK_ELEMENTS (late layers, K labels), it is formed in cache-sized blocks of
     (label, output channel) rows, G_{n,k}[c0:c1] @ unfold(a_n)^T, and every norm is taken from
     the block while it is in cache (:meth:`ConvRule.reduce_blocked`; 3x faster on the CNN's last
     convolution, where T = 4 positions make the kernel write-bound). For 2-D convolutions without groups in
     float32 on the CPU, the norms instead come from a compiled kernel that forms each register tile of the
     gradient and reduces it there (:mod:`uvood.scores.conv_kernel`; torch's kernels where it cannot
     run). Squared l2 alone may instead come from
     the ghost norm ||sum_t g_t a_t^T||^2 = sum_{t,t'} (a_t . a_t')(g_t . g_t') (Gram matrices of
     the T output positions), chosen per layer by a cost model (:meth:`ConvRule.ghost_cheaper`):
     cheaper where T (d + K Cout) < K Cout d, i.e. on late layers with few positions.
   * ``BatchNorm`` in eval mode: grad weight = sum over positions of g * x_hat, grad bias =
     sum of g, with x_hat from the running statistics.
   * anything else that owns parameters: ``torch.func`` (``functional_call`` + ``vjp`` under
     ``vmap``) on the recorded inputs, one vector-Jacobian product per (sample, cotangent).

   Parameters shared between modules (or a module called twice), and gradients with a
   constant ``offset`` added (BatchGrad's anchor gradient), are formed per sample and summed
   before the norm; everything else uses the cheapest rule.

4. Coverage (first micro-batch): the autograd graph of the logits is walked once, and every
   operation that feeds a selected parameter must lie inside the recorded forward of a module
   owning it (:func:`uncovered_params`). A parameter also used elsewhere (tied weights, a
   child's weight in ``F.linear`` / ``F.conv2d`` in a parent's ``forward``, a layer that is
   never called itself) would otherwise lose that part of its gradient silently; such
   parameters are taken out of the per-layer records and differentiated through the whole
   model with ``torch.func`` (:class:`ModelRule`, exact, slower), or, where ``torch.func``
   cannot run the model, refused with a :class:`~uvood.errors.UvoodError` naming them. Models
   without such parameters pay one graph walk on the first micro-batch and nothing else.

Why eval mode: the gradient of sum_n loss_n w.r.t. theta splits into per-sample gradients only
if the samples do not interact. BatchNorm in training mode (or without running statistics)
normalises with batch statistics, which couples the samples: :func:`per_sample_grad_norms`
refuses such models with a :class:`~uvood.errors.UvoodError`. The score objects in
:mod:`uvood.scores.gradient` run the model inside :func:`uvood.model.eval_mode` (like every
``Score.from_model``), so a model left in training mode is scored in eval mode and its flags
are restored afterwards.

The per-sample loop (one ``loss.backward()`` per sample and label) exists only as the test and
benchmark reference, :mod:`uvood.scores.reference`.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UvoodError
from ..model import forward_head
from . import conv_kernel

NORMS = ("l1", "l2sq")

#: K cotangents in one vmapped backward (``is_grads_batched``) instead of K backward passes
BATCHED_BACKWARD = False

#: elements (per micro-batch chunk) allowed for materialised per-sample gradients
CHUNK_ELEMENTS = 2**23

#: cost of one ghost-norm multiply-add relative to one of the per-sample weight-gradient kernel
#: (:meth:`ConvRule.ghost_cheaper`); measured on CPU with benchmarks/fused_pass.py: 1.1-2.0 on the CNN
GHOST_FACTOR = 1.5
#: the same against the compiled kernel (:mod:`uvood.scores.conv_kernel`), for the layers it covers: 1.7-3.0 on
#: the CNN's convolutions with T >= 64 positions (benchmarks/fused_pass.py, 2026-11-30)
GHOST_FACTOR_COMPILED = 2.3

#: elements of one block of a sample's per-sample convolution weight gradient (labels x output channels x patch)
#: formed and reduced while it is in cache (:meth:`ConvRule.reduce_blocked`); gradients of at most this many
#: elements per sample take the convolution's own kernel instead (2**19 float32 = 2 MiB, measured:
#: benchmarks/fused_pass.py)
BLOCK_ELEMENTS = 2**19

log = logging.getLogger(__name__)
_GHOST_LOGGED: dict = {}  # (layer, input shape, K) -> last choice logged


def reduce_norm(t: torch.Tensor, norm: str, inplace: bool = False) -> torch.Tensor:
    """Per-row norm over every dimension after the first two: K x n x ... -> K x n (float64).

    Reduced in the tensor's own dtype, then converted to float64. ``inplace=True`` lets the l1
    norm overwrite ``t`` with |t| (a fresh temporary: no new allocation, about 3x faster).
    """
    t = t.flatten(2)
    if norm == "l1" and inplace:
        return t.abs_().sum(-1).to(torch.float64)
    return _vector_norm(t, norm)


def _vector_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """||t_row||_1 or ||t_row||_2^2 over the last dimension, as float64."""
    if norm == "l1":
        return t.abs().sum(-1).to(torch.float64)
    return torch.linalg.vector_norm(t, 2, dim=-1).to(torch.float64) ** 2


# ---------------------------------------------------------------- per-layer rules


class LayerRule:
    """Per-sample gradients of one module's own parameters from its input and output gradient.

    ``inputs``: the module's positional inputs (first dimension = n samples); ``kwargs``: its
    keyword inputs; ``g``: the gradient w.r.t. its output, K x n x ... (K cotangents);
    ``names``: the names (``module.named_parameters(recurse=False)``) to compute.
    """

    def grad_sample(self, module: nn.Module, inputs: tuple, kwargs: dict, g: torch.Tensor,
                    names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Per-sample gradients, ``{name: K x n x *param.shape}``, as new tensors (the engine
        may overwrite them)."""
        raise NotImplementedError

    def norms(self, module: nn.Module, inputs: tuple, kwargs: dict, g: torch.Tensor,
              names: Iterable[str], norm: str) -> dict[str, torch.Tensor]:
        """Per-sample norms ``{name: K x n}`` for the names this rule can do without forming the
        gradients (a subset of ``names``, possibly empty); the engine forms the rest. A rule with
        ``multi_norm = True`` also accepts a tuple of norms and then returns ``L x K x n`` values."""
        return {}

    def sample_elements(self, module: nn.Module, inputs: tuple, names: Iterable[str]) -> int:
        """Elements one sample needs besides its gradients (e.g. unfolded patches); for chunking."""
        return 0


_RULES: dict[type, LayerRule] = {}


def register_rule(*module_types: type) -> Callable:
    """Class decorator: ``@register_rule(nn.Linear) class LinearRule(LayerRule): ...``.

    A rule registered for a type also serves its subclasses that do not override ``forward``.
    """

    def deco(cls):
        rule = cls()
        for t in module_types:
            _RULES[t] = rule
        return cls

    return deco


def rule_for(module: nn.Module) -> LayerRule:
    """The rule of ``module``'s type, else the ``torch.func`` fallback."""
    t = type(module)
    if t in _RULES:
        return _RULES[t]
    for base in t.__mro__[1:]:
        if base in _RULES and t.forward is base.forward:
            return _RULES[base]
    return FALLBACK


def rules() -> dict[type, LayerRule]:
    """The registered per-layer rules (type -> rule)."""
    return dict(_RULES)


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """y = a W^T + b. Per sample: grad W = sum_positions g a^T, grad b = sum_positions g.

    2-D input: rank one, ||g a^T||_1 = ||g||_1 ||a||_1, ||g a^T||_2^2 = ||g||_2^2 ||a||_2^2.
    """

    def grad_sample(self, module, inputs, kwargs, g, names):
        a = inputs[0]
        out = {}
        if "weight" in names:
            if a.ndim == 2:
                out["weight"] = g.unsqueeze(-1) * a.unsqueeze(0).unsqueeze(-2)
            else:
                k, n = g.shape[:2]
                out["weight"] = torch.einsum("knmo,nmi->knoi", g.reshape(k, n, -1, g.shape[-1]),
                                             a.reshape(n, -1, a.shape[-1]))
        if "bias" in names:
            out["bias"] = g.clone() if g.ndim == 3 else g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]).sum(2)
        return out

    multi_norm = True

    def norms(self, module, inputs, kwargs, g, names, norm):
        a = inputs[0]
        if a.ndim != 2:
            return {}
        if not isinstance(norm, str):
            parts = [self.norms(module, inputs, kwargs, g, names, nm) for nm in norm]
            return {name: torch.stack([p[name] for p in parts]) for name in parts[0]}
        out = {}
        gn = _vector_norm(g, norm)
        if "weight" in names:
            out["weight"] = gn * _vector_norm(a, norm).unsqueeze(0)
        if "bias" in names:
            out["bias"] = gn
        return out


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule):
    """Per-sample weight gradients of a convolution; bias = sum of g over positions.

    The weight gradient of sample n alone (= g_n @ unfold(a_n)^T) comes from the convolution's
    own weight-gradient kernel called on that sample, with the K cotangents stacked along the
    output channels (the gradient w.r.t. K stacked copies of the filters holds each label's
    gradient): one kernel call per sample for all labels. On CPU this beat both the unfold +
    bmm formulation and the grouped-convolution trick (samples stacked along channels,
    groups = n) for the paper's CNN. Padding modes other than zeros, and padding="same", are
    applied to a first.
    """

    @staticmethod
    def _padded(module, a):
        """(input, padding list) with padding modes other than zeros, and padding="same", applied to a."""
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return a, list(module.padding)
        pad = module._reversed_padding_repeated_twice
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return (F.pad(a, pad, mode=mode) if any(pad) else a), [0] * (a.ndim - 2)

    @staticmethod
    def _per_sample_weight_grads(module, a, g):
        """Yield (i, gradient of sample i as G*K*Cout/G x Cin/G x kernel, i.e. group-major) for every sample."""
        a, padding = ConvRule._padded(module, a)
        w = module.weight
        G = module.groups
        K, n = g.shape[:2]
        cout, cin_g = w.shape[:2]
        spatial = g.shape[3:]
        # K x n x Cout x ... -> n x 1 x (G * K * Cout/G) x ...: each group holds its channels for every k
        gs = g.reshape(K, n, G, cout // G, *spatial).transpose(0, 1).transpose(1, 2)
        gs = gs.reshape(n, 1, G * K * (cout // G), *spatial)
        proxy = w.detach().repeat(K, *([1] * (w.ndim - 1)))  # K*Cout x Cin/G x kernel (shape only)
        for i in range(n):
            _, gw, _ = torch.ops.aten.convolution_backward(
                gs[i], a[i:i + 1], proxy, None, list(module.stride), padding, list(module.dilation), False,
                [0] * (a.ndim - 2), G, [False, True, False])
            yield i, gw

    @staticmethod
    def _label_major(gw, K, G):
        """G*K*Cout/G x ... (group-major) -> K x (Cout * Cin/G * kernel)."""
        if G == 1:
            return gw.reshape(K, -1)  # a copy only when the kernel returns gw channels-last
        return gw.view(G, K, -1).transpose(0, 1).reshape(K, -1)

    def grad_sample(self, module, inputs, kwargs, g, names):
        out = {}
        K, n = g.shape[:2]
        if "weight" in names:
            w = module.weight
            res = torch.empty(K, n, *w.shape, dtype=g.dtype, device=g.device)
            for i, gw in self._per_sample_weight_grads(module, inputs[0], g):
                res[:, i] = self._label_major(gw, K, module.groups).view(K, *w.shape)
            out["weight"] = res
        if "bias" in names:
            out["bias"] = g.sum(dim=tuple(range(3, g.ndim))) if g.ndim > 3 else g.clone()
        return out

    multi_norm = True
    #: its norms cost one kernel call per sample, as forming the gradient does (see _norms_from_records)
    materialises = True

    @staticmethod
    def ghost_cheaper(module, a, g) -> bool:
        """Whether the ghost norm beats the per-sample kernel for this layer's squared l2 norm (cost model).

        Per sample, with T output positions, d = Cin k^2 patch elements, K cotangents: the kernel costs
        K Cout d T multiply-adds, the ghost norm T^2 d (patch Gram) + K T^2 Cout (gradient Grams). The
        ghost norm is chosen when GHOST_FACTOR times its count is smaller (GHOST_FACTOR_COMPILED against the
        compiled kernel where it runs; both measured: benchmarks/fused_pass.py); only for 2-D convolutions
        without groups. Logged at debug level."""
        if not isinstance(module, nn.Conv2d) or module.groups != 1 or a.ndim != 4:
            return False
        K = g.shape[0]
        T = math.prod(g.shape[3:])
        cout, d = module.weight.shape[0], module.weight[0].numel()
        kernel, ghost = K * cout * d * T, T * T * (d + K * cout)
        compiled = conv_kernel.covers(module, a, g) and conv_kernel.available()
        factor = GHOST_FACTOR_COMPILED if compiled else GHOST_FACTOR
        choice = factor * ghost < kernel
        key = (id(module), tuple(a.shape[1:]), K)
        if _GHOST_LOGGED.get(key) != choice:
            _GHOST_LOGGED[key] = choice
            log.debug("conv %s (T=%d, d=%d, Cout=%d, K=%d): %s (kernel %.3g, ghost %.3g x %.1f multiply-adds)",
                      tuple(module.weight.shape), T, d, cout, K, "ghost norm" if choice else
                      ("compiled kernel" if compiled else "per-sample kernel"), kernel, ghost, factor)
        return choice

    @staticmethod
    def ghost_l2sq(module, a, g) -> torch.Tensor:
        """K x n squared l2 norms of the per-sample weight gradients by the ghost-norm identity

            ||sum_t g_t a_t^T||_2^2 = sum_{t,t'} (a_t . a_t') (g_t . g_t')

        with a_t the unfolded input patch at output position t and g_t the output gradient there,
        from the Gram matrices of the patches (n x T x T) and of the gradients (K x n x T x T),
        in chunks of samples; no per-sample gradient is formed."""
        a, padding = ConvRule._padded(module, a)
        K, n = g.shape[:2]
        T = math.prod(g.shape[3:])
        out = torch.empty(K, n, dtype=g.dtype, device=g.device)
        chunk = max(1, CHUNK_ELEMENTS // max(1, (K + 1) * T * T))
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            A = F.unfold(a[lo:hi], module.kernel_size, dilation=module.dilation, padding=padding,
                         stride=module.stride)  # m x d x T
            ga = torch.bmm(A.transpose(1, 2), A)  # m x T x T
            gg = g.transpose(0, 1)[lo:hi].reshape((hi - lo) * K, g.shape[2], T)  # a view of sample-major g
            gg = torch.bmm(gg.transpose(1, 2), gg).view(hi - lo, K, T, T)
            out[:, lo:hi] = (gg * ga.unsqueeze(1)).sum((-1, -2)).T
        return out

    @staticmethod
    def blocked(module, a, g) -> bool:
        """Whether :meth:`reduce` forms each sample's weight gradient in blocks (:meth:`reduce_blocked`): 2-D
        convolutions without groups whose K x Cout x d per-sample gradient exceeds BLOCK_ELEMENTS."""
        return (isinstance(module, nn.Conv2d) and module.groups == 1 and a.ndim == 4
                and g.shape[0] * module.weight.numel() > BLOCK_ELEMENTS)

    @staticmethod
    def reduce_blocked(module, a, g, reds) -> torch.Tensor:
        """R x K x n (float64): :meth:`reduce` of the weight with each sample's gradient formed in blocks.

        Per sample n, with A_n the d x T unfolded input patches (d = Cin k^2, T output positions) and
        G_n the (K Cout) x T output gradients, the weight gradient of label k is G_{n,k} A_n^T (Cout x d).
        It is formed in blocks of rows (labels k0..k1 x output channels c0..c1, at most BLOCK_ELEMENTS
        elements, one matrix product each) into one preallocated buffer that stays in cache, and every
        reduction accumulates its per-row value |.|_1 or ||.||_2 from the block at once: no pass over a
        gradient that left the cache. Exact (same products and sums as the kernel, in another order).
        Row values are summed in float64: l1 = sum_rows ||row||_1, l2sq = sum_rows ||row||_2^2."""
        a, padding = ConvRule._padded(module, a)
        K, n = g.shape[:2]
        cout, d = module.weight.shape[0], module.weight[0].numel()
        T = math.prod(g.shape[3:])
        G = g.transpose(0, 1).reshape(n, K, cout, T)  # a view of the engine's sample-major buffer
        if cout * d <= BLOCK_ELEMENTS:
            kb, cb = max(1, min(K, BLOCK_ELEMENTS // (cout * d))), cout
        else:
            kb, cb = 1, max(1, BLOCK_ELEMENTS // d)
        offs = [None if off is None else off.detach().to(g.dtype).reshape(cout, d) for _, off in reds]
        # offset reductions first (on a second buffer), then plain l2sq, then plain l1 (|.| in place)
        order = sorted(range(len(reds)), key=lambda j: (offs[j] is None, reds[j][0] == "l1"))
        buf = g.new_empty(kb * cb * d)
        tmp = g.new_empty(kb * cb * d) if any(o is not None for o in offs) else None
        rows = g.new_empty(len(reds), n, K, cout)  # per-row l1 or l2 norms
        for i in range(n):
            At = F.unfold(a[i:i + 1], module.kernel_size, dilation=module.dilation, padding=padding,
                          stride=module.stride)[0].T  # T x d
            for k0 in range(0, K, kb):
                k1 = min(K, k0 + kb)
                for c0 in range(0, cout, cb):
                    c1 = min(cout, c0 + cb)
                    m = (k1 - k0) * (c1 - c0)
                    blk = buf[:m * d].view(k1 - k0, c1 - c0, d)
                    torch.mm(G[i, k0:k1, c0:c1].reshape(m, T), At, out=blk.view(m, d))
                    for j in order:
                        t = blk
                        if offs[j] is not None:
                            t = torch.add(blk, offs[j][c0:c1], out=tmp[:m * d].view(k1 - k0, c1 - c0, d))
                        if reds[j][0] == "l1":
                            torch.sum(t.abs_(), dim=2, out=rows[j, i, k0:k1, c0:c1])
                        else:
                            torch.linalg.vector_norm(t, 2, dim=2, out=rows[j, i, k0:k1, c0:c1])
        rows = rows.to(torch.float64)
        return torch.stack([(rows[j] if nm == "l1" else rows[j] ** 2).sum(-1).T for j, (nm, _) in enumerate(reds)])

    def norms(self, module, inputs, kwargs, g, names, norm):
        """``norm`` may be a tuple of norms: then every value is L x K x n, from ONE pass over the
        per-sample weight gradients (their kernel calls dominate the cost). Squared l2 alone, where
        the cost model says so (:meth:`ghost_cheaper`), comes from the ghost norm instead."""
        single = isinstance(norm, str)
        wanted = (norm,) if single else tuple(norm)
        if "weight" in names and set(wanted) == {"l2sq"} and self.ghost_cheaper(module, inputs[0], g):
            sq = self.ghost_l2sq(module, inputs[0], g).to(torch.float64)
            out = {"weight": sq if single else sq.expand(len(wanted), *sq.shape)}
            if "bias" in names:
                b = _vector_norm(g.sum(dim=tuple(range(3, g.ndim))) if g.ndim > 3 else g, "l2sq")
                out["bias"] = b if single else b.expand(len(wanted), *b.shape)
            return out
        out = {}
        for name in ("weight", "bias"):
            if name in names:
                vals = self.reduce(module, inputs, g, name, [(nm, None) for nm in wanted])
                out[name] = vals[0] if single else vals
        return out

    def reduce(self, module, inputs, g, name, reds) -> torch.Tensor:
        """R x K x n (float64): for each (norm, offset) of ``reds``, the norm of the per-sample gradient of
        parameter ``name`` plus ``offset`` (a tensor of the parameter's shape, or None), from ONE kernel
        call per sample for every reduction (BatchGrad's anchor offset included: no gradient is stored).
        Weights of 2-D convolutions take the compiled kernel (:mod:`uvood.scores.conv_kernel`: each tile
        of the gradient formed and reduced in registers) where it runs; else torch's kernel, per sample or
        in blocks (:meth:`reduce_blocked`)."""
        K, n = g.shape[:2]
        if name == "bias":
            b = g.sum(dim=tuple(range(3, g.ndim))) if g.ndim > 3 else g
            return torch.stack([_vector_norm(b if off is None else b + off.to(b.dtype), nm) for nm, off in reds])
        fast = conv_kernel.weight_norms(module, *self._padded(module, inputs[0]), g, reds)
        if fast is not None:  # the compiled kernel: no per-sample gradient formed
            return fast
        if self.blocked(module, inputs[0], g):
            return self.reduce_blocked(module, inputs[0], g, reds)
        offs = [None if off is None else off.detach().to(g.dtype).reshape(1, -1) for _, off in reds]
        # offset reductions first (on a temporary), then plain l2sq, then plain l1 (|.| in place on gw)
        order = sorted(range(len(reds)), key=lambda j: (offs[j] is None, reds[j][0] == "l1"))
        res = torch.empty(len(reds), n, K, dtype=g.dtype, device=g.device)
        tmp = None
        for i, gw in self._per_sample_weight_grads(module, inputs[0], g):
            flat = self._label_major(gw, K, module.groups)
            for j in order:
                t = flat
                if offs[j] is not None:
                    if tmp is None or tmp.shape != flat.shape:
                        tmp = torch.empty_like(flat)
                    t = torch.add(flat, offs[j], out=tmp)
                if reds[j][0] == "l1":
                    torch.sum(t.abs_(), dim=1, out=res[j, i])
                else:
                    torch.linalg.vector_norm(t, 2, dim=1, out=res[j, i])
        res = res.transpose(1, 2).to(torch.float64)
        return torch.stack([res[j] if reds[j][0] == "l1" else res[j] ** 2 for j in range(len(reds))])


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(LayerRule):
    """Eval-mode BatchNorm y = x_hat * w + b, x_hat = (a - running_mean) / sqrt(running_var + eps).

    Per sample: grad w = sum over positions of g * x_hat, grad b = sum over positions of g.
    """

    def grad_sample(self, module, inputs, kwargs, g, names):
        a = inputs[0]
        shape = (1, -1) + (1,) * (a.ndim - 2)
        x_hat = (a - module.running_mean.view(shape)) / torch.sqrt(module.running_var.view(shape) + module.eps)
        K, n = g.shape[:2]
        out = {}
        if "weight" in names:
            out["weight"] = (g * x_hat.unsqueeze(0)).reshape(K, n, a.shape[1], -1).sum(-1)
        if "bias" in names:
            out["bias"] = g.reshape(K, n, a.shape[1], -1).sum(-1)
        return out


class FuncRule(LayerRule):
    """Fallback for module types without a rule: ``torch.func`` vjp of the module's own forward
    w.r.t. its own parameters, vmapped over samples and cotangents. Keyword inputs are passed
    unbatched; positional tensors whose first dimension is n are split per sample."""

    def grad_sample(self, module, inputs, kwargs, g, names):
        from torch.func import functional_call, vjp, vmap

        names = list(names)
        params = {name: getattr(module, name).detach() for name in names}
        n = g.shape[1]
        in_dims = tuple(0 if isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == n else None
                        for t in inputs)

        def one(g_n, *args_n):
            args1 = tuple(t.unsqueeze(0) if d == 0 else t for t, d in zip(args_n, in_dims))
            _, vjp_fn = vjp(lambda p: functional_call(module, p, args1, kwargs), params)
            return vmap(lambda gk: vjp_fn(gk.unsqueeze(0))[0])(g_n)

        res = vmap(one, in_dims=(1, *in_dims))(g, *inputs)  # name -> n x K x ...
        return {k: v.transpose(0, 1) for k, v in res.items()}


FALLBACK = FuncRule()


class ModelRule(LayerRule):
    """Per-sample gradients of parameters the per-layer records do not cover (used outside their
    own module's forward: tied weights, ``F.linear(h, self.fc.weight)`` in a parent, a child's
    weight read by its parent): ``torch.func`` vjp of the WHOLE model's logits w.r.t. those
    parameters, vmapped over samples and cotangents. ``names`` are dotted parameter names of the
    model; ``g`` is the cotangent at the logits (K x n x C). Exact, and as slow as the textbook
    per-sample loop vectorised, so it only serves the parameters that need it."""

    def __init__(self, head: nn.Module):
        self.head = head

    def grad_sample(self, module, inputs, kwargs, g, names):
        from torch.func import functional_call, vjp, vmap

        params = {name: module.get_parameter(name).detach() for name in names}
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_hook(lambda m, i, o: captured.append(o))

        def logits_of(prm, x1):
            captured.clear()
            functional_call(module, prm, (x1,))
            return captured[-1].reshape(x1.shape[0], -1)

        def one(g_n, x_n):
            _, vjp_fn = vjp(lambda p: logits_of(p, x_n.unsqueeze(0)), params)
            return vmap(lambda gk: vjp_fn(gk.unsqueeze(0))[0])(g_n)

        try:
            res = vmap(one, in_dims=(1, 0))(g, inputs[0])  # name -> n x K x ...
        except UvoodError:
            raise
        except Exception as e:
            raise UvoodError(
                f"Parameter(s) {sorted(names)} are used outside their own module's forward (tied weights, or "
                f"F.linear / F.conv with a module's weight in a parent's forward), so the per-layer rules do not "
                f"cover them, and differentiating the whole model per sample with torch.func failed ({e}). "
                "Call the module instead of its weight, or leave them out with params=.") from None
        finally:
            handle.remove()
        return {k: v.transpose(0, 1) for k, v in res.items()}


# ---------------------------------------------------------------- capture


@dataclass
class _Record:
    """One recorded module call. ``params``: the parameters this record differentiates
    (name -> parameter; default: the module's own), ``rule``: how (default: :func:`rule_for`)."""

    module: nn.Module
    inputs: tuple
    kwargs: dict
    output: torch.Tensor
    versions: list = field(default_factory=list)
    grad: torch.Tensor | None = None
    params: dict = field(default_factory=dict)
    rule: LayerRule | None = None

    def __post_init__(self):
        if not self.params:
            self.params = dict(self.module.named_parameters(recurse=False))
        if self.rule is None:
            self.rule = rule_for(self.module)


def _versions(inputs, output):
    return [t._version for t in (*inputs, output) if isinstance(t, torch.Tensor)]


class _Tape:
    """Forward hooks on the modules owning selected parameters; ``safe`` clones inputs and outputs
    so that later in-place operations cannot change what was recorded."""

    def __init__(self, modules: list[nn.Module], safe: bool):
        self.records: list[_Record] = []
        self.safe = safe
        self.handles = []
        for m in modules:
            if safe:
                self.handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))

    @staticmethod
    def _pre(module, args, kwargs):
        return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), kwargs

    def _hook(self, module, args, kwargs, output):
        if not isinstance(output, torch.Tensor):
            raise UvoodError(
                f"The gradient engine needs modules with parameters to return one tensor; "
                f"{type(module).__name__} returned {type(output).__name__}. Register a rule for it "
                "(uvood.scores.engine.register_rule) or use a shallow score.")
        record = _Record(module, tuple(args), dict(kwargs), output, _versions(args, output))
        self.records.append(record)
        if self.safe:
            return output.clone()
        return None

    def remove(self):
        for h in self.handles:
            h.remove()

    def modified(self) -> bool:
        return any(_versions(r.inputs, r.output) != r.versions for r in self.records)


def _reachable(start, stop: set, edges: list | None = None) -> set:
    """Autograd nodes reachable from ``start`` without entering a node in ``stop``; with ``edges``,
    append every (node, parameter) edge to a parameter's AccumulateGrad node."""
    seen = set()
    todo = [start] if start is not None else []
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None or nxt in stop:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                if edges is not None:
                    edges.append((node, var))
                continue
            todo.append(nxt)
    return seen


def uncovered_params(logits: torch.Tensor, records: list[_Record], selected: dict[int, nn.Parameter]) -> set[int]:
    """ids of the selected parameters that receive a gradient through an operation outside the
    recorded forward of every module that owns them (the per-layer rules would miss that part).

    The autograd graph of the logits is walked once: every edge (operation -> parameter) must lie
    inside a record's own region (from its output back to its inputs) of a module owning the
    parameter. Parameters that receive no gradient at all contribute 0, correctly.
    """
    edges: list = []
    _reachable(logits.grad_fn, set(), edges)
    covered: dict[int, set] = {}
    for r in records:
        own = [p for p in r.params.values() if id(p) in selected]
        if not own:
            continue
        stop = {t.grad_fn for t in (*r.inputs, *r.kwargs.values()) if isinstance(t, torch.Tensor)}
        stop.discard(None)
        region = _reachable(r.output.grad_fn, stop)
        for p in own:
            covered.setdefault(id(p), set()).update(region)
    return {id(p) for node, p in edges if id(p) in selected and node not in covered.get(id(p), ())}


def check_independent(model: nn.Module) -> None:
    """Refuse models whose outputs couple the samples of a batch (train-mode BatchNorm)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training:
                raise UvoodError(
                    f"BatchNorm module {name!r} is in training mode: it normalises with batch statistics, "
                    "which couples the samples, so per-sample gradients are not defined. Call model.eval() "
                    "(or use the score objects, which run the model in eval mode).")
            if not m.track_running_stats or m.running_mean is None:
                raise UvoodError(
                    f"BatchNorm module {name!r} has no running statistics (track_running_stats=False), so it "
                    "normalises with batch statistics even in eval mode, coupling the samples. Per-sample "
                    "gradients are not defined for this model.")


def _slice(items, lo, hi, n):
    return tuple(t[lo:hi] if isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == n else t for t in items)


def _rule_norms(rule: LayerRule, module, inputs, kwargs, g, names, norms: tuple[str, ...]) -> dict:
    """{name: L x K x n} for the L norms: in one call where the rule supports it (``multi_norm``)."""
    if getattr(rule, "multi_norm", False):
        return rule.norms(module, inputs, kwargs, g, names, norms)
    parts = [rule.norms(module, inputs, kwargs, g, names, nm) for nm in norms]
    return {name: torch.stack([p[name] for p in parts]) for name in parts[0] if all(name in p for p in parts)}


def _reduce_many(grad: torch.Tensor, pid: int, reductions: list[Reduction]) -> torch.Tensor:
    """R x K x n values of materialised per-sample gradients ``grad`` (K x n x ...) of one parameter:
    each reduction's norm of ``grad + offset`` (offset 0 where the reduction has none for ``pid``).

    Offset reductions first (each on a fresh ``grad + offset``, |.| in place), then the plain
    ones, l2sq before l1 (the last l1 overwrites ``grad`` with |grad|)."""
    out: list = [None] * len(reductions)
    off = [r.offsets.get(pid) if r.offsets else None for r in reductions]
    plain = [j for j in range(len(reductions)) if off[j] is None]
    for j in range(len(reductions)):
        if off[j] is not None:
            out[j] = reduce_norm(grad + off[j].to(grad.dtype), reductions[j].norm, inplace=True)
    plain.sort(key=lambda j: reductions[j].norm == "l1")
    for i, j in enumerate(plain):
        out[j] = reduce_norm(grad, reductions[j].norm, inplace=i == len(plain) - 1)
    return torch.stack(out)


def _norms_from_records(records: list[_Record], selected: dict[int, torch.nn.Parameter],
                        reductions: tuple[Reduction, ...], K: int, n: int, device) -> torch.Tensor:
    """R x K x n: every reduction of every per-sample gradient row, summed over the selected parameters.

    Per (record, parameter): the rule's own norms (no gradient formed: rank-one Linear, the conv's
    per-sample kernel or ghost norm) serve the reductions without an offset; reductions with an
    offset, and parameters shared between records, are formed per sample (in chunks) and reduced
    there. Rules with a ``reduce`` method (convolutions) serve every reduction of an unshared
    parameter, offsets included, from one kernel call per sample without storing the gradients;
    rules with ``materialises = True`` serve every reduction of a parameter from ONE formed
    gradient when any reduction needs it formed."""
    R = len(reductions)
    total = torch.zeros(R, K, n, dtype=torch.float64, device=device)
    # (record, name) pairs; group the records into units that share parameters
    owners: dict[int, list[int]] = {}
    names: list[list[str]] = []
    for i, r in enumerate(records):
        own = [nm for nm, p in r.params.items() if id(p) in selected]
        names.append(own)
        for nm in own:
            owners.setdefault(id(r.params[nm]), []).append(i)
    shared = {pid for pid, idx in owners.items() if len(idx) > 1}
    # fast path: the rule's norms for unshared parameters, reductions without an offset
    todo: list[dict[str, list[int]]] = []  # per record: name -> reductions to form the gradient for
    for i, r in enumerate(records):
        mat: dict[str, list[int]] = {}
        todo.append(mat)
        if r.grad is None:
            continue
        fast_groups: dict[tuple[int, ...], list[str]] = {}
        for nm in names[i]:
            pid = id(r.params[nm])
            with_offset = [j for j, red in enumerate(reductions) if red.offsets and pid in red.offsets]
            if with_offset and pid not in shared and hasattr(r.rule, "reduce"):  # offsets without storing gradients
                total += r.rule.reduce(r.module, r.inputs, r.grad, nm, [
                    (red.norm, red.offsets.get(pid) if red.offsets else None) for red in reductions])
                continue
            if pid in shared or (with_offset and getattr(r.rule, "materialises", False)):
                mat[nm] = list(range(R))
                continue
            if with_offset:
                mat[nm] = with_offset
            fast = tuple(j for j in range(R) if j not in with_offset)
            if fast:
                fast_groups.setdefault(fast, []).append(nm)
        for js, nms in fast_groups.items():
            got = _rule_norms(r.rule, r.module, r.inputs, r.kwargs, r.grad, nms, tuple(reductions[j].norm for j in js))
            dest = total if len(js) == R else total[list(js)]  # all reductions: no gather / scatter per value
            for v in got.values():
                dest += v
            if dest is not total:
                total[list(js)] = dest
            for nm in nms:
                if nm not in got:
                    mat[nm] = sorted(set(mat.get(nm, [])) | set(js))
    # materialised path, unit by unit (a unit = records linked by shared parameters)
    parent = list(range(len(records)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for idx in owners.values():
        for j in idx[1:]:
            parent[find(j)] = find(idx[0])
    units: dict[int, list[int]] = {}
    for i in range(len(records)):
        if todo[i] and records[i].grad is not None:
            units.setdefault(find(i), []).append(i)
    for members in units.values():
        wanted: dict[int, list[int]] = {}
        for i in members:
            for nm, js in todo[i].items():
                pid = id(records[i].params[nm])
                wanted[pid] = sorted(set(wanted.get(pid, [])) | set(js))
        per_sample = sum(selected[pid].numel() for pid in wanted) * K * (2 if any(
            red.offsets for red in reductions) else 1)
        per_sample += sum(records[i].rule.sample_elements(records[i].module, records[i].inputs, list(todo[i]))
                          for i in members)
        chunk = max(1, CHUNK_ELEMENTS // max(1, per_sample))
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            acc: dict[int, torch.Tensor] = {}
            for i in members:
                r = records[i]
                gs = r.rule.grad_sample(r.module, _slice(r.inputs, lo, hi, n), r.kwargs, r.grad[:, lo:hi],
                                        list(todo[i]))
                for nm in todo[i]:
                    pid = id(r.params[nm])
                    acc[pid] = gs[nm] if pid not in acc else acc[pid] + gs[nm]
            for pid, grad in acc.items():
                js = wanted[pid]
                total[js, :, lo:hi] += _reduce_many(grad, pid, [reductions[j] for j in js])
    return total


def _select(model: nn.Module, params) -> dict[int, nn.Parameter]:
    if params is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
    else:
        chosen = [p for p in params if p is not None]
        all_ids = {id(p) for p in model.parameters()}
        if any(id(p) not in all_ids for p in chosen):
            raise UvoodError("params= must be parameters of the model.")
    if not chosen:
        raise UvoodError("No parameter of the model requires grad, so every parameter gradient is empty. "
                         "Set requires_grad=True on the parameters to differentiate, or use a shallow score.")
    return {id(p): p for p in chosen}


@dataclass(eq=False)
class Reduction:
    """One reduction of every per-sample gradient row: ``norm`` ("l1" or "l2sq") of the gradient
    plus ``offsets`` (``{id(param): tensor}``, a constant added to that parameter's per-sample
    gradient first: BatchGrad's anchor gradient; None = no offset)."""

    norm: str
    offsets: dict | None = None


@dataclass(eq=False)
class RowGroup:
    """Cotangent rows back-propagated from the logits and the reductions wanted of their gradients.

    ``cotangents`` maps the logits of a micro-batch (n x C, float64) to K x n x C cotangents.
    """

    cotangents: Callable[[torch.Tensor], torch.Tensor]
    reductions: tuple[Reduction, ...]


def per_sample_grad_norms(
    model: nn.Module,
    x: torch.Tensor,
    cotangents: Callable[[torch.Tensor], torch.Tensor],
    *,
    norm: str | tuple[str, ...] = "l1",
    head=None,
    params: Iterable[nn.Parameter] | None = None,
    offsets: dict[int, torch.Tensor] | None = None,
    batch_size: int = 128,
    max_rows: int | None = None,
    max_memory: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradient norms ``norms[k, n] = || d <v_{k,n}, z_n> / d theta ||`` and the logits.

    Args:
        model: the classifier; must not couple samples (no train-mode BatchNorm: refused).
        x: inputs, N x ...
        cotangents: maps the logits of a micro-batch (n x C, float64) to K x n x C cotangents
            v (float64; cast to the model's dtype), e.g. ``(e_k - p) / T`` for every label k.
        norm: ``"l1"`` or ``"l2sq"`` (squared Euclidean), summed over all parameters; or a tuple of
            them, computed from the same backward pass (then ``norms`` is L x K x N).
        head: the logits layer, as in :func:`uvood.model.forward_features`.
        params: the parameters theta (default: all with ``requires_grad``).
        offsets: ``{id(param): tensor}`` constant gradients added to every per-sample gradient
            before the norm (BatchGrad's anchor gradient).
        batch_size: samples per forward/backward micro-batch (at most; fewer where ``max_memory``
            cannot hold them).
        max_rows: at most this many (sample, cotangent) rows of layer output gradients are held
            at once; the K cotangents of a micro-batch are back-propagated in chunks of
            max(1, max_rows // batch). None: chosen from ``max_memory`` (:func:`plan_micro_batch`).
        max_memory: the memory budget in bytes for the pass (None: about what a forward + backward
            of the batch holds, :func:`plan_micro_batch`); ignored when ``max_rows`` is given.

    Returns:
        ``(norms, logits)``: K x N float64 and N x C float64.
    """
    wanted = (norm,) if isinstance(norm, str) else tuple(norm)
    if not wanted or any(nm not in NORMS for nm in wanted):
        raise UvoodError(f"norm={norm!r} is not valid; choose one of {', '.join(NORMS)} (or a tuple of them).")
    group = RowGroup(cotangents, tuple(Reduction(nm, dict(offsets) if offsets else None) for nm in wanted))
    (norms,), logits = per_sample_grad_reductions(model, x, [group], head=head, params=params,
                                                  batch_size=batch_size, max_rows=max_rows, max_memory=max_memory)
    return (norms[0] if isinstance(norm, str) else norms), logits


def per_sample_grad_reductions(
    model: nn.Module,
    x: torch.Tensor,
    groups: list[RowGroup],
    *,
    head=None,
    params: Iterable[nn.Parameter] | None = None,
    batch_size: int = 128,
    max_rows: int | None = None,
    max_memory: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """ONE forward per micro-batch, every group's cotangent rows back-propagated through that same
    graph, and every group's reductions of the per-sample gradients (:class:`RowGroup`).

    Returns ``([R_g x K_g x N float64 per group], logits N x C float64)``: entry ``[r, k, n]`` of a
    group is ``|| d <v_{k,n}, z_n> / d theta + offset_r ||`` in the norm of its reduction r. The
    other arguments are those of :func:`per_sample_grad_norms`.
    """
    for grp in groups:
        if not grp.reductions or any(r.norm not in NORMS for r in grp.reductions):
            raise UvoodError(f"norms {[r.norm for r in grp.reductions]} are not valid; choose among "
                             f"{', '.join(NORMS)}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UvoodError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if x.ndim == 0 or x.shape[0] == 0:
        raise UvoodError(f"x is empty (shape {tuple(x.shape)}): pass at least one sample.")
    check_independent(model)
    selected = _select(model, params)
    modules = [m for m in model.modules() if any(id(p) in selected for p in m.parameters(recurse=False))]
    if x.is_inference():
        x = x.clone()
    parts: list[list[torch.Tensor]] = [[] for _ in groups]
    all_logits = []
    plan: dict = {}  # filled on the first micro-batch: the parameters the records do not cover
    with torch.enable_grad():
        if max_rows is None:
            batch_size, max_rows = plan_micro_batch(model, x, groups, head, modules, batch_size, max_memory)
        for lo in range(0, x.shape[0], batch_size):
            xb = x[lo:lo + batch_size]
            values, logits = _micro_batch(model, xb, groups, head, modules, selected, max_rows, plan)
            for acc, v in zip(parts, values):
                acc.append(v)
            all_logits.append(logits)
    return [torch.cat(p, dim=2) for p in parts], torch.cat(all_logits, dim=0)


def default_memory() -> int:
    """The default memory budget of a deep pass: a quarter of the machine's RAM (bytes; 4 GiB if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 * 2**30


#: the smallest micro-batch the planner prefers before it splits the K cotangents into chunks
MIN_BATCH = 4

#: default budget of a deep pass: this times what a plain forward + backward of the batch holds (plan_micro_batch)
BOUND_FACTOR = 1.2

#: the default budget is at least this (bytes, besides the materialised chunks): smaller micro-batches would save
#: no memory that matters and cost a forward's fixed overhead each (small models such as the MLP)
MIN_MEMORY = 2**26


def plan_micro_batch(model, x, groups, head, modules, batch_size: int, budget: int | None) -> tuple[int, int]:
    """(samples per micro-batch, max_rows) that fit ``budget`` bytes, measured on a probe of 2 samples
    (once per model and input shape: :func:`_per_sample_bytes`).

    Per sample: ``act`` = bytes of the distinct storages autograd saves in the forward
    (``saved_tensors_hooks``; the model's parameters and buffers, saved too, are not per sample;
    a tensor saved twice counts once) and of the recorded module outputs; ``row`` = bytes of one
    cotangent's output gradients at the recorded modules. A micro-batch of n samples with k
    cotangents at once holds about
    n (act + (k + [k > 1]) row): the k rows of output gradients, plus, for k > 1, the gradients of
    the backward in flight before they are copied into the buffers (:func:`_output_grads`); plus
    the materialised chunks (3 x CHUNK_ELEMENTS elements).

    ``budget=None``: what a plain forward + backward of the batch (min(batch_size, N) samples)
    holds, m (act + row) (the saved activations and the gradients in flight), times BOUND_FACTOR
    (at least MIN_MEMORY, at most :func:`default_memory`): the deep pass stays near that bound, with smaller
    micro-batches rather than stacked copies.

    All K cotangents at once (the per-sample kernels then run once per sample) with as many samples
    (up to ``batch_size``) as fit, in micro-batches of equal size (N = 64 at 57 per micro-batch:
    2 x 32, not 57 + 7); below MIN_BATCH samples, the cotangents are split into chunks.
    """
    act, rows, C, elsize = _per_sample_bytes(model, x, head, modules)
    K = max(grp.cotangents(torch.zeros(1, C, dtype=torch.float64, device=x.device)).shape[0] for grp in groups)
    N = x.shape[0]
    n = min(batch_size, N)
    fixed = 3 * CHUNK_ELEMENTS * elsize
    if budget is None:
        budget = min(default_memory(), max(int(BOUND_FACTOR * n * (act + rows)), MIN_MEMORY) + fixed)
    avail = budget - fixed
    k = K
    need = act + (K + (K > 1)) * rows
    if n * need > avail:
        n = int(avail // need)
        if n < min(MIN_BATCH, N):  # too few samples: split the cotangents instead
            n = max(1, min(MIN_BATCH, N, int(avail // (act + 2 * rows))))
            k = max(1, min(K, int((avail / n - act) // max(rows, 1.0)) - 1))
    n = math.ceil(N / math.ceil(N / n))  # equal micro-batches
    log.debug("deep pass plan: %d samples x %d cotangents per chunk (act %.0f kB, row %.0f kB per sample, "
              "budget %.0f MB)", n, k, act / 1e3, rows / 1e3, budget / 1e6)
    return n, n * k


#: per model (weakly held): (input shape, dtype, device, head, recorded modules) -> _per_sample_bytes
_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _per_sample_bytes(model, x, head, modules) -> tuple[float, float, int, int]:
    """(act, row, C, bytes per logit) of :func:`plan_micro_batch`, measured by a forward of 2 samples under
    ``saved_tensors_hooks``; kept per model and input shape, so that the next call (the next batch of
    a data set) plans without a probe forward."""
    key = (tuple(x.shape[1:]), x.dtype, x.device, head if isinstance(head, str) else id(head),
           tuple(id(m) for m in modules))
    cache = _PROBES.setdefault(model, {})
    if key in cache:
        return cache[key]
    saved: dict = {}
    constant = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def count(t):  # a storage's bytes, at most those of its largest saved view (x[:2] is a view of x)
        st = t.untyped_storage()
        if st.data_ptr() not in constant:
            saved[st.data_ptr()] = max(saved.get(st.data_ptr(), 0), min(st.nbytes(), t.numel() * t.element_size()))

    def pack(t):
        count(t)
        return t

    tape = _Tape(modules, False)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, _, logits = forward_head(model, x[:2], head)
    finally:
        tape.remove()
    m = logits.shape[0]
    for r in tape.records:
        count(r.output)
    cache[key] = (sum(saved.values()) / m, sum(r.output.numel() * r.output.element_size() for r in tape.records) / m,
                  logits.shape[1], logits.element_size())
    return cache[key]


def _plan_coverage(model, logits, records, selected, head_module, plan):
    """First micro-batch: find the parameters the records do not cover (:func:`uncovered_params`);
    they are taken out of their modules' records and differentiated through the whole model."""
    if "uncovered" not in plan:
        ids = uncovered_params(logits, records, selected)
        plan["uncovered"] = {name: p for name, p in model.named_parameters() if id(p) in ids}
        plan["rule"] = ModelRule(head_module)
    return plan["uncovered"]


def _output_grads(logits: torch.Tensor, outs: list[torch.Tensor], vk: torch.Tensor, last: bool,
                  cache: dict | None = None) -> list:
    """Gradients of <vk[k], logits> w.r.t. every recorded output, K x output shape each (None where
    unused), written into one preallocated buffer per output (no list of K copies to stack).

    ``cache`` (one dict per pass) keeps the buffers for the next chunk and micro-batch: a fresh
    buffer of a few hundred MB costs more in page faults than the copies into it (measured: 0.22 s
    against 0.05 s for 296 MB); a smaller micro-batch uses the first rows of a larger buffer, a chunk
    of another K replaces it."""
    K = vk.shape[0]
    if K == 1:
        grads = torch.autograd.grad(logits, outs, vk[0], allow_unused=True, retain_graph=not last)
        return [None if gr is None else gr.unsqueeze(0) for gr in grads]
    if BATCHED_BACKWARD:
        return list(torch.autograd.grad(logits, outs, vk, allow_unused=True, is_grads_batched=True,
                                        retain_graph=not last))
    # sample-major buffers (n x K x ...), returned as K x n views: a sample's K gradients are then one
    # contiguous block, which the convolution rule passes to its per-sample kernel without a copy
    bufs: list = [None] * len(outs)
    for k in range(K):
        gk = torch.autograd.grad(logits, outs, vk[k], allow_unused=True, retain_graph=not (last and k == K - 1))
        for j, gr in enumerate(gk):
            if gr is None:
                continue
            if bufs[j] is None:
                shape = (gr.shape[0], K, *gr.shape[1:])
                buf = None if cache is None else cache.pop(j, None)  # at most one buffer per output
                if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0] or buf.dtype != gr.dtype:
                    del buf
                    buf = torch.empty(shape, dtype=gr.dtype, device=gr.device)
                if cache is not None:
                    cache[j] = buf
                bufs[j] = buf[:gr.shape[0]]
            bufs[j][:, k].copy_(gr)
        del gk
    return [None if b is None else b.transpose(0, 1) for b in bufs]


def record_forward(model, xb, head, modules) -> tuple[nn.Module, torch.Tensor, list[_Record]]:
    """One forward of the micro-batch ``xb`` with every call of ``modules`` recorded (:class:`_Tape`; again in
    safe mode, recording clones, when an in-place operation changed a record). Returns (head module, logits,
    the records whose output requires grad)."""
    for safe in (False, True):
        tape = _Tape(modules, safe)
        try:
            head_module, _, logits = forward_head(model, xb, head)
        finally:
            tape.remove()
        if not tape.modified():
            break
    else:  # pragma: no cover - safe mode records clones, which nothing else can modify
        raise UvoodError("A recorded activation was modified in place during the forward pass.")
    return head_module, logits, [r for r in tape.records if r.output.requires_grad]


def _micro_batch(model, xb, groups, head, modules, selected, max_rows, plan):
    head_module, logits, records = record_forward(model, xb, head, modules)
    n = logits.shape[0]
    z64 = logits.detach().to(torch.float64)
    vs = []
    for grp in groups:
        v = grp.cotangents(z64)
        if v.ndim != 3 or v.shape[1:] != z64.shape:
            raise UvoodError(f"cotangents must return K x n x C = K x {n} x {z64.shape[1]}, got {tuple(v.shape)}.")
        vs.append(v.to(logits.dtype))
    uncovered = _plan_coverage(model, logits, records, selected, head_module, plan)
    whole = None
    if uncovered:
        ids = {id(p) for p in uncovered.values()}
        for r in records:
            r.params = {nm: p for nm, p in r.params.items() if id(p) not in ids}
        whole = _Record(model, (xb.detach(),), {}, logits, params=dict(uncovered), rule=plan["rule"])
    for r in records:
        r.inputs = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in r.inputs)
    outs = [r.output for r in records]
    everything = records + ([whole] if whole is not None else [])
    # the K cotangents in chunks, so that at most max_rows (sample, cotangent) rows of output
    # gradients are held at once
    k_chunk = max(1, max_rows // max(1, n))
    results = []
    for gi, (grp, v) in enumerate(zip(groups, vs)):
        K = v.shape[0]
        parts = []
        for k0 in range(0, K, k_chunk):
            vk = v[k0:k0 + k_chunk]
            last = gi == len(groups) - 1 and k0 + k_chunk >= K
            for r in everything:
                r.grad = None  # free the previous chunk's buffers before the next backward
            if records:
                for r, gr in zip(records, _output_grads(logits, outs, vk, last, plan.setdefault("buffers", {}))):
                    r.grad = gr
            if whole is not None:
                whole.grad = vk
            with torch.no_grad():
                parts.append(_norms_from_records(everything, selected, grp.reductions, vk.shape[0], n, z64.device))
        norms = torch.cat(parts, dim=1)
        # parameters with an offset but no recorded gradient contribute ||offset|| for every sample
        seen = {id(p) for r in everything if r.grad is not None for p in r.params.values()}
        for j, red in enumerate(grp.reductions):
            for pid, off in (red.offsets or {}).items():
                if pid in selected and pid not in seen:
                    norms[j] += reduce_norm(off.reshape(1, 1, -1), red.norm)[0, 0]
        results.append(norms)
    for r in everything:
        r.grad = None
    return results, z64
