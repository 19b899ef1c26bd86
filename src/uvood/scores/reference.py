"""Textbook references for the gradient scores: slow, explicit, used only by tests and benchmarks.

One sample at a time, on a float64 copy of the model in eval mode, one ``loss.backward()`` per
(sample, label), norms as explicit sums over the parameters' ``.grad``. Nothing here shares
code with the closed forms or the engine (except :func:`uvood.model.forward_features` to read
the logits), and the orientation table is written out again below, so a test comparing the
two checks the signs as well.

Also here: :func:`official_gradnorm_loop`, the official GradNorm code's way (per sample:
forward, loss against targets of ones, backward, L1 norm of the last layer's weight
gradient), and :func:`func_grad_norms`, per-sample gradients with ``torch.func``
(``functional_call`` + ``vmap(jacrev)``) over the whole model, as other toolkits do.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import UvoodError
from ..model import find_head, forward_features, head_name

# Orientation per (label, agg, weight), written out (see uvood.scores.gradient): higher = more ID.
SIGN = {
    ("uniform", "norm_of_mean", "none"): +1,
    ("uniform", "mean_of_norm", "none"): +1,
    ("predicted", "norm_of_mean", "none"): +1,
    ("predicted", "norm_of_mean", "logp_over_p"): +1,
    ("predicted", "mean_of_norm", "none"): -1,
    ("predicted", "mean_of_norm", "logp_over_p"): -1,
}


def float_copy(model: nn.Module, x: torch.Tensor, head=None, dtype=torch.float64):
    """A deep copy of ``model`` in ``dtype`` and eval mode, and its head module."""
    name = head_name(model, find_head(model, x[:1], head))
    m = copy.deepcopy(model).to(dtype).eval()
    return m, dict(m.named_modules())[name]


def _params(m: nn.Module, head_module: nn.Module, depth: str, bias: bool) -> list[nn.Parameter]:
    if depth == "deep":
        return [p for p in m.parameters() if p.requires_grad]
    params = [head_module.weight]
    if bias:
        if head_module.bias is None:
            raise UvoodError("bias=true but the head has no bias.")
        params.append(head_module.bias)
    return params


def _norm(tensors, norm: str) -> float:
    total = 0.0
    for t in tensors:
        total += float(t.abs().sum()) if norm == "l1" else float((t * t).sum())
    return total


def per_label_gradients(m, head_module, xn, params, T):
    """For one sample: p (float64) and [grad_params log p^(k) for k in 0..C-1], one backward each."""
    _, logits = forward_features(m, xn, head_module)
    logp = torch.log_softmax(logits / T, dim=1)[0]
    grads = []
    C = logp.shape[0]
    for k in range(C):
        for p in params:
            p.grad = None
        logp[k].backward(retain_graph=k < C - 1)
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params])
    return logp.detach().exp().to(torch.float64), grads


def per_sample_label_gradients(model, x, *, depth="shallow", T=1.0, bias=False, head=None, dtype=torch.float64):
    """[(p, [grads of log p^(k) for every k]) for every sample]: the textbook loop, once."""
    m, hm = float_copy(model, x, head, dtype)
    params = _params(m, hm, depth, bias)
    return [per_label_gradients(m, hm, x[n:n + 1].to(dtype), params, T) for n in range(x.shape[0])]


def score_from_gradients(per_sample, *, label="uniform", agg="norm_of_mean", norm="l1", weight="none",
                         official=False) -> torch.Tensor:
    """sign * raw from :func:`per_sample_label_gradients`, with explicit sums over labels and parameters."""
    out = []
    for p, grads in per_sample:
        C = p.shape[0]
        coef = []
        for k in range(C):
            q = (1.0 if official else 1.0 / C) if label == "uniform" else float(p[k])
            w = float(torch.log(p[k]) / p[k]) if weight == "logp_over_p" else 1.0
            coef.append(q * w)
        if agg == "norm_of_mean":
            n_params = len(grads[0])
            mean = [sum(coef[k] * grads[k][j].to(torch.float64) for k in range(C)) for j in range(n_params)]
            raw = _norm(mean, norm)
        else:
            raw = sum(coef[k] * _norm([g.to(torch.float64) for g in grads[k]], norm) for k in range(C))
        out.append(SIGN[(label, agg, weight)] * raw)
    return torch.tensor(out, dtype=torch.float64)


def reference_grad_score(model, x, *, label="uniform", agg="norm_of_mean", norm="l1", weight="none",
                         depth="shallow", T=1.0, bias=False, official=False, head=None,
                         dtype=torch.float64) -> torch.Tensor:
    """sign * raw for ``grad(...)``, textbook style (one backward per sample and label)."""
    per_sample = per_sample_label_gradients(model, x, depth=depth, T=T, bias=bias, head=head, dtype=dtype)
    return score_from_gradients(per_sample, label=label, agg=agg, norm=norm, weight=weight, official=official)


def reference_batchgrad(model, x, anchor_x, anchor_y, *, depth="shallow", T=1.0, bias=False, head=None,
                        dtype=torch.float64) -> torch.Tensor:
    """-E_{Y~p}[|| grad (log p^(Y)(x) + sum_i log p^(y_i)(x_i)) ||_1] (Eq. 6), textbook style."""
    m, hm = float_copy(model, x, head, dtype)
    params = _params(m, hm, depth, bias)
    anchor = [torch.zeros_like(p) for p in params]
    for i in range(anchor_x.shape[0]):
        for p in params:
            p.grad = None
        _, logits = forward_features(m, anchor_x[i:i + 1].to(dtype), hm)
        torch.log_softmax(logits / T, dim=1)[0, int(anchor_y[i])].backward()
        anchor = [a + (0 if p.grad is None else p.grad) for a, p in zip(anchor, params)]
    out = []
    for n in range(x.shape[0]):
        p, grads = per_label_gradients(m, hm, x[n:n + 1].to(dtype), params, T)
        total = 0.0
        for k in range(p.shape[0]):
            total += float(p[k]) * _norm([g + a for g, a in zip(grads[k], anchor)], "l1")
        out.append(-total)
    return torch.tensor(out, dtype=torch.float64)


def official_gradnorm_loop(model, x, head=None, T=1.0, copy_model=True, dtype=None) -> torch.Tensor:
    """The official GradNorm code's way, per sample: forward, loss = sum_k -log softmax(z/T)_k
    (targets of ones), backward, S = L1 norm of the last layer's weight gradient."""
    if copy_model:
        m, hm = float_copy(model, x, head, dtype or torch.float64)
    else:
        m, hm = model, find_head(model, x[:1], head)
    dt = hm.weight.dtype
    out = []
    logsoftmax = nn.LogSoftmax(dim=-1)
    for n in range(x.shape[0]):
        m.zero_grad()
        _, outputs = forward_features(m, x[n:n + 1].to(dt), hm)
        targets = torch.ones_like(outputs)
        loss = torch.mean(torch.sum(-targets * logsoftmax(outputs / T), dim=-1))
        loss.backward()
        out.append(float(torch.sum(torch.abs(hm.weight.grad))))
    return torch.tensor(out, dtype=torch.float64)


def func_grad_norms(model, x, *, norm="l1", T=1.0, chunk=16) -> torch.Tensor:
    """Per-sample, per-label norms ||grad_theta log p^(k)(x_n)|| (C x N) with torch.func.

    ``vmap(jacrev(...))`` over samples of the whole model, ``functional_call`` on the
    parameters with requires_grad; materialises C x P numbers per sample (chunked). The model
    must be in eval mode and its output must be the logits (``head`` is not used).
    """
    from torch.func import functional_call, jacrev, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def logp_direct(prm, xn):
        z = functional_call(model, prm, (xn.unsqueeze(0),))
        return torch.log_softmax(z.reshape(1, -1)[0] / T, dim=0)

    jac = vmap(jacrev(logp_direct), in_dims=(None, 0))
    outs = []
    for lo in range(0, x.shape[0], chunk):
        J = jac(params, x[lo:lo + chunk])  # name -> n x C x *shape
        total = 0
        for name in names:
            t = J[name].flatten(2)
            total = total + (t.abs().sum(-1) if norm == "l1" else (t * t).sum(-1))
        outs.append(total.T.to(torch.float64))
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------- gradient methods since the paper
# (uvood.scores.since). Per sample, float64, one loss.backward() each; subspaces by numpy's SVD.


def _kl_uniform_loss(logits, T):
    """-(1/C) sum_k log softmax(z / T)_k for one sample (KL(u || p) up to a constant)."""
    return -torch.log_softmax(logits / T, dim=1)[0].mean()


def reference_gaia(model, x, *, variant="a", layer="auto", target="authors", T=1.0, head=None,
                   dtype=torch.float64) -> torch.Tensor:
    """GAIA, textbook style, per sample with explicit loops over channels: retain the gradient of every
    chosen feature map (``auto``: BatchNorm2d/3d and GroupNorm outputs, else convolutions, else hidden
    linear layers), call ``backward()`` on the output y, take Lambda_{l,c} = |mean over positions| (a) or
    the share of non-zeros (z), and S = -mean_{l,c} Lambda_{l,c}^2.

    ``target=authors`` follows the authors' code (github.com/JGEthanChen/GAIA-OOD, ``cal_method.py``):
    GAIA-Z: y = max_k z_k; GAIA-A: y = sum_d h_d (the head's input), Lambda divided by
    o = sqrt(mean_d |dL/dh_d|) from a first backward of L = sum_k log softmax(z / T)_k. ``predicted``:
    y = -log p^(yhat); ``uniform``: y = the KL to the uniform."""
    m, hm = float_copy(model, x, head, dtype)
    flat = layer == "head"
    if layer == "auto":
        chosen = []
        for kinds in ((nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm), (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            chosen = chosen or [mod for mod in m.modules() if isinstance(mod, kinds)]
        if not chosen:  # an MLP: the hidden linear layers' outputs, one position per unit
            chosen, flat = [mod for mod in m.modules() if isinstance(mod, nn.Linear) and mod is not hm], True
    elif layer == "head":
        chosen = []
    else:
        chosen = [mod for name, mod in m.named_modules() if name.lower() == layer.lower()]
    feature_sum = target == "authors" and variant == "a"
    out = []
    for n in range(x.shape[0]):
        kept, head_in = [], []

        def keep_out(mod, inp, o, kept=kept):
            o.retain_grad()
            kept.append(o)
            return o.clone()  # later in-place ops (ReLU(inplace=True)) act on the copy

        def keep_in(mod, inp, o, head_in=head_in):
            inp[0].retain_grad()
            head_in.append(inp[0])

        handles = [mod.register_forward_hook(keep_out) for mod in chosen] + [hm.register_forward_hook(keep_in)]
        m.zero_grad()
        _, logits = forward_features(m, x[n:n + 1].to(dtype), hm)
        for hd in handles:
            hd.remove()
        h = head_in[0]
        if layer == "head":
            kept = [h]
        scale = 1.0
        if feature_sum:
            torch.log_softmax(logits / T, dim=1)[0].sum().backward(retain_graph=True)
            o2 = sum(abs(float(v)) for v in h.grad.reshape(-1)) / h.numel()
            scale = 1.0 / o2
            for t in kept:
                t.grad = None
            h.sum().backward()
        elif target == "authors":
            logits[0].max().backward()
        elif target == "uniform":
            _kl_uniform_loss(logits, T).backward()
        else:
            (-torch.log_softmax(logits / T, dim=1)[0, int(logits[0].argmax())]).backward()
        total, channels = 0.0, 0
        for a in kept:
            g = torch.zeros_like(a[0]) if a.grad is None else a.grad[0]
            if flat:
                g = g.reshape(-1, 1)
            elif g.ndim < 2 or g[0].numel() < 2:
                continue
            for c in range(g.shape[0]):
                gc = g[c].reshape(-1)
                stat = abs(float(gc.sum()) / gc.numel()) if variant == "a" else float((gc != 0).sum()) / gc.numel()
                total += stat * stat
                channels += 1
        out.append(-scale * total / max(channels, 1))
    return torch.tensor(out, dtype=torch.float64)


def _head_grads(model, x, loss_fn, head, dtype, bias=False, deep=False):
    """Per sample: the flattened gradient of loss_fn(logits) w.r.t. the head's weight (and bias; with
    ``deep`` every parameter with requires_grad, in named_parameters order), N x P, float64."""
    m, hm = float_copy(model, x, head, dtype)
    rows = []
    for n in range(x.shape[0]):
        m.zero_grad()
        _, logits = forward_features(m, x[n:n + 1].to(dtype), hm)
        loss_fn(logits).backward()
        if deep:
            parts = [torch.zeros(p.numel(), dtype=dtype) if p.grad is None else p.grad.reshape(-1)
                     for p in m.parameters() if p.requires_grad]
            rows.append(torch.cat(parts).to(torch.float64).clone())
            continue
        parts = [hm.weight.grad.reshape(hm.weight.shape[0], -1)]
        if bias:
            parts.append(hm.bias.grad.reshape(-1, 1))
        rows.append(torch.cat(parts, dim=1).reshape(-1).to(torch.float64).clone())
    return torch.stack(rows), hm


def reference_gradorth(model, x, h_id, k, *, T=1.0, head=None, dtype=torch.float64) -> torch.Tensor:
    """GradOrth, textbook style: S_k = top-k right singular vectors of the ID features h_id (numpy SVD);
    per sample, the head-weight gradient G (C x D) of the KL-to-uniform loss by backward, projected
    G S_k S_k^T, and its Frobenius norm."""
    import numpy as np

    _, _, vt = np.linalg.svd(h_id.detach().double().reshape(h_id.shape[0], -1).numpy(), full_matrices=False)
    s = torch.from_numpy(vt[:k].T.copy())
    grads, hm = _head_grads(model, x, lambda z: _kl_uniform_loss(z, T), head, dtype)
    out = []
    for row in grads:
        G = row.reshape(hm.weight.shape[0], -1)
        out.append(float(torch.linalg.matrix_norm(G @ s @ s.T)))
    return torch.tensor(out, dtype=torch.float64)


def reference_lowdim(model, x_id, x, k, *, bias=False, depth="shallow", head=None,
                     dtype=torch.float64) -> torch.Tensor:
    """Low-dimensional gradients, textbook style: per ID sample the head gradient (``depth=deep``: the
    gradient over every parameter) of logsumexp(z) by backward (N x P, materialised), its top-k right
    singular vectors V (numpy SVD, uncentred), the
    features phi = G V, their mean and covariance (numpy, divided by n, pseudo-inverse), and
    S(x) = -(phi(x) - mu)^T Sigma^+ (phi(x) - mu) with phi(x) from x's own backward."""
    import numpy as np

    lse = lambda z: torch.logsumexp(z, dim=1)[0]  # noqa: E731
    g_id, _ = _head_grads(model, x_id, lse, head, dtype, bias, depth == "deep")
    _, _, vt = np.linalg.svd(g_id.numpy(), full_matrices=False)
    v = vt[:k].T
    phi = g_id.numpy() @ v
    mu = phi.mean(0)
    prec = np.linalg.pinv(np.cov(phi.T, bias=True).reshape(k, k), hermitian=True)
    g, _ = _head_grads(model, x, lse, head, dtype, bias, depth == "deep")
    d = g.numpy() @ v - mu
    return torch.from_numpy(-np.einsum("ni,ij,nj->n", d, prec, d))


def reference_fisher(model, x, *, depth="shallow", T=1.0, bias=False, head=None, dtype=torch.float64) -> torch.Tensor:
    """-tr F(x) = -sum_k p^(k) ||grad log p^(k)||_2^2, textbook style (one backward per sample and label)."""
    out = []
    for p, grads in per_sample_label_gradients(model, x, depth=depth, T=T, bias=bias, head=head, dtype=dtype):
        out.append(-sum(float(p[k]) * _norm([g.to(torch.float64) for g in grads[k]], "l2sq")
                        for k in range(p.shape[0])))
    return torch.tensor(out, dtype=torch.float64)
