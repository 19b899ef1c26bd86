"""Speed of the gradient methods since the paper (uvood.scores.since): fast path vs the authors' way.

    OMP_NUM_THREADS=1 python benchmarks/since_speed.py [--quick] [--repeats 3] [--threads 1]
        [--write benchmarks/RESULTS.md]
    OMP_NUM_THREADS=1 python benchmarks/since_speed.py --calibrate   # the conv cost model's factor, per layer

Models: the MLP and the CNN of benchmarks/gradient_scores.py (random weights, eval mode, float32).
For each method, in ONE run (interleaved rounds, best of ``--repeats``, CPU time of the process):

* fast path: the uvood score (GAIA: one batched forward and ONE backward to the feature maps; Fisher
  deep: the engine; GradOrth, low-dim, Fisher shallow: the head closed forms from one forward);
* the authors' way: GAIA as their code does it, one batched backward per batch of 128 with tensor hooks
  (their code never loops over samples); GradOrth and the Fisher trace one sample at a time (forward,
  ``backward()``, statistics of ``.grad``; the Fisher trace needs one backward per label); low-dim: ``torch.func``
  ``vmap(grad)`` per-sample gradients (head, or every parameter), materialised, projected onto the
  basis (deep low-dim's fast path: one forward and one backward per batch, the projection from the layer
  records, uvood.scores.since.project_gradients);
* the cost of one batched forward + backward of the same model on the same batch (and of one forward):
  each fast path is also reported as a multiple of it.

Targets: >= 10x the authors' way on the MLP, >= 1.5x on the CNN, shallow forms at about the cost of a
forward pass. Values of the two paths are compared (max relative difference, float32). Every path runs at
least one forward pass, so its ratio to the authors' way is at most (forward samples/s) / (authors'
samples/s): the output prints that bound beside each target (IMPOSSIBLE where it is below the target).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradient_scores import cnn, machine_info, mlp, race  # noqa: E402
from uvood.model import find_head, head_name  # noqa: E402
from uvood.scores import get_score  # noqa: E402


def forward_backward(model, x):
    """One batched forward + backward of the KL-to-uniform loss to every parameter (the unit of cost)."""
    model.zero_grad()
    (-torch.log_softmax(model(x), dim=1).mean()).backward()


def forward(model, x):
    with torch.no_grad():
        model(x)


class _GradHooks:
    """Tensor hooks storing the gradient at the outputs of ``layers`` (keys 0, 1, ...) and at the head's input ("h",
    kept last), as the authors' ``Grad_all_hook`` does."""

    def __init__(self, layers, head):
        self.grads, self.kept = {}, []
        self.handles = [m.register_forward_hook(self._out) for m in layers]
        self.handles.append(head.register_forward_hook(lambda m, i, o: self._store(i[0], "h")))

    def _out(self, module, inputs, output):
        self._store(output, len(self.kept))

    def _store(self, t, key):
        t.register_hook(lambda g: self.grads.__setitem__(key, g.detach()))
        self.kept.append(t)

    def remove(self):
        for h in self.handles:
            h.remove()


def authors_gaia(model, x, variant, batch=128):
    """GAIA the authors' way (github.com/JGEthanChen/GAIA-OOD, cal_method.py, hook.py): per batch of 128 (their
    default), one forward with tensor hooks storing the gradient at every BatchNorm output (an MLP: the hidden
    linear outputs, uvood's extension), then GAIA-Z: ONE backward of the summed max logits, the share of non-zero
    gradients per channel, squared, averaged over the channels, negated; GAIA-A: one backward of
    sum_k log softmax(z)_k (the output term o^2 = mean |dL/dh|, taken at the head's input h as uvood does) and
    one of the summed h, then -mean_c (|mean over positions of the gradient|^2 / o^2). The parameters' gradients
    are reset per batch (their ``net.zero_grad()``); the zero share is the mean of ``(g != 0).float()`` (their
    ``torch.where(g != 0, ones, zeros)``, one tensor fewer)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    head = find_head(model, x[:1])
    layers = norms or [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    out = []
    for lo in range(0, x.shape[0], batch):
        model.zero_grad()  # as their cal_zero / cal_grad_value do per batch (and independent of the paths run before)
        hooks = _GradHooks(layers, head)
        z = model(x[lo:lo + batch])
        hooks.remove()
        grads, kept = hooks.grads, hooks.kept
        maps = range(len(kept) - 1)
        if variant == "z":
            z.max(dim=1).values.sum().backward()
            stat = torch.cat([(grads[k] != 0).float().reshape(z.shape[0], grads[k].shape[1], -1).mean(-1)
                              for k in maps], dim=1)
            out.append(-(stat.double() ** 2).mean(1))
            continue
        torch.log_softmax(z, dim=1).sum().backward(retain_graph=True)
        o2 = grads["h"].abs().mean(1).double()
        kept[-1].sum().backward()
        stat = torch.cat([grads[k].reshape(z.shape[0], grads[k].shape[1], -1).mean(-1).abs() for k in maps], dim=1)
        out.append(-(stat.double() ** 2).mean(1) / o2)
    return torch.cat(out)


def loop_gradorth(model, x, basis):
    """GradOrth one sample at a time: backward of the KL-to-uniform loss, the head-weight gradient
    projected onto the fitted subspace, its Frobenius norm."""
    head = find_head(model, x[:1])
    s = basis.to(torch.float32)
    out = []
    for n in range(x.shape[0]):
        model.zero_grad()
        (-torch.log_softmax(model(x[n:n + 1]), dim=1).mean()).backward()
        out.append(float(torch.linalg.matrix_norm(head.weight.grad @ s @ s.T)))
    return torch.tensor(out, dtype=torch.float64)


def loop_fisher(model, x, deep):
    """Fisher trace one sample at a time: one backward per label k of log p^(k), sum_k p^(k) ||grad||_2^2."""
    head = find_head(model, x[:1])
    params = [p for p in model.parameters()] if deep else [head.weight]
    out = []
    for n in range(x.shape[0]):
        logp = torch.log_softmax(model(x[n:n + 1]), dim=1)[0]
        total = 0.0
        for k in range(logp.shape[0]):
            gs = torch.autograd.grad(logp[k], params, retain_graph=k < logp.shape[0] - 1, allow_unused=True)
            total += float(logp[k].detach().exp()) * float(sum((g * g).sum() for g in gs if g is not None))
        out.append(-total)
    return torch.tensor(out, dtype=torch.float64)


def func_lowdim(model, x, score, chunk=64):
    """Low-dim the torch.func way: vmap(grad) per-sample head gradients of logsumexp(z) (materialised),
    projected onto the fitted basis, Mahalanobis distance in the subspace."""
    name = head_name(model, find_head(model, x[:1]))
    params = {k: v.detach() for k, v in model.named_parameters()}
    basis = score.basis.to(torch.float32).reshape(score.basis.shape[0], -1)

    def lse(w, xn):
        prm = dict(params)
        prm[f"{name}.weight"] = w
        return torch.logsumexp(functional_call(model, prm, (xn.unsqueeze(0),)), dim=1)[0]

    g = vmap(grad(lse), in_dims=(None, 0))
    outs = []
    for lo in range(0, x.shape[0], chunk):
        gs = g(params[f"{name}.weight"], x[lo:lo + chunk]).flatten(1)
        d = (gs @ basis.T).double() - score.mu
        outs.append(-((d @ score.precision) * d).sum(1))
    return torch.cat(outs)


def func_lowdim_deep(model, x, score, chunk=16):
    """Deep low-dim the per-sample-gradient way (the authors' ``vmap(grad)`` feature path): per-sample
    gradients of logsumexp(z) over every parameter, materialised, projected onto the basis."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {k: v.detach() for k, v in model.named_parameters()}
    basis = score.basis.to(torch.float32)

    def lse(prm, xn):
        return torch.logsumexp(functional_call(model, prm, (xn.unsqueeze(0),)), dim=1)[0]

    g = vmap(grad(lse), in_dims=(None, 0))
    outs = []
    for lo in range(0, x.shape[0], chunk):
        gs = g(params, x[lo:lo + chunk])
        flat = torch.cat([gs[n].flatten(1) for n in names], dim=1)
        d = (flat @ basis.T).double() - score.mu
        outs.append(-((d @ score.precision) * d).sum(1))
    return torch.cat(outs)


def calibrate(repeats: int, l_values=(10, 20), n: int = 64) -> None:
    """The conv cost model's factor (uvood.scores.since.CONV_KERNEL_FACTOR), measured per conv layer of the CNN:
    the time per multiply-add of the materialising path (the engine's per-sample weight-gradient kernel, then one
    matmul onto the l directions, through a reused buffer) over that of the stacked path (the input's patches times
    the l stacked filters, dotted with g).
    The stacked path is chosen where l T < factor (T + l)."""
    from uvood.scores import since
    from uvood.scores.engine import record_forward

    torch.manual_seed(0)
    model, x = cnn().eval(), torch.rand(n, 3, 32, 32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    head = find_head(model, x[:1])
    with torch.enable_grad():
        _, logits, records = record_forward(model, x, head, convs)
        grads = torch.autograd.grad(logits, [r.output for r in records], torch.softmax(logits.detach(), 1))
    print("| conv (Cout, Cin, k, k) | T | l | kernel+matmul ms | stacked ms | kernel MACs / stacked MACs | factor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    factors = []
    for r, g in zip(records, grads):
        g = g.detach()
        w = r.module.weight
        T, d, cout = g[0, 0].numel(), w[0].numel(), w.shape[0]
        for l in l_values:
            vs = {"weight": torch.randn(l, *w.shape)}
            paths = [(lambda xx, r=r, g=g, vs=vs: since._project_conv_kernel(r.module, r.inputs[0], g, vs["weight"]),
                      x),
                     (lambda xx, r=r, g=g, vs=vs: since._project_conv_stacked(r.module, r.inputs[0], g, vs["weight"]),
                      x)]
            (rate_k, rate_s), _ = race(paths, repeats, clock=time.process_time)
            kernel, stacked = cout * d * T + l * cout * d, l * cout * d * T
            f = (n / rate_k / kernel) / (n / rate_s / stacked)
            factors.append(f)
            print(f"| {tuple(w.shape)} | {T} | {l} | {1e3 * n / rate_k:.1f} | {1e3 * n / rate_s:.1f} | "
                  f"{kernel / stacked:.3f} | {f:.2f} |")
    factors.sort()
    print(f"\nfactor (per multiply-add, kernel path / stacked path): median {factors[len(factors) // 2]:.2f}, "
          f"range {factors[0]:.2f}-{factors[-1]:.2f}; uvood uses CONV_KERNEL_FACTOR = {since.CONV_KERNEL_FACTOR}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke test)")
    ap.add_argument("--write", type=Path, default=None, help="append the table to this markdown file")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--calibrate", action="store_true", help="measure the conv cost model's factor and stop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.calibrate:
        calibrate(args.repeats)
        return
    torch.manual_seed(0)
    s = 4 if args.quick else 1
    models = {"MLP": (mlp().eval(), torch.rand(512 // s, 1, 28, 28), 64 // s),
              "CNN": (cnn().eval(), torch.rand(128 // s, 3, 32, 32), 16 // s)}
    rows, checks = [], []  # rows: (model, method, path, samples/s, x authors' way, x forward+backward)
    for name, (model, x, n_loop) in models.items():
        x_fit = torch.rand(256 // s, *x.shape[1:])
        gradorth, lowdim, lowdim_deep = get_score("gradorth"), get_score("lowdim"), get_score("lowdim(depth=deep)")
        for sc in (gradorth, lowdim, lowdim_deep):
            sc.fit(model, x_fit, None)
        methods = [
            ("GAIA-A", "deep", get_score("gaia"), lambda xx, m=model: authors_gaia(m, xx, "a"),
             "authors' batched backward"),
            ("GAIA-Z", "deep", get_score("gaia(variant=z)"), lambda xx, m=model: authors_gaia(m, xx, "z"),
             "authors' batched backward"),
            ("Fisher trace", "deep", get_score("fisher(depth=deep)"), lambda xx, m=model: loop_fisher(m, xx, True),
             "per-sample loop, one backward per label"),
            ("Low-dim gradients", "deep", lowdim_deep, lambda xx, m=model, sc=lowdim_deep: func_lowdim_deep(m, xx, sc),
             "torch.func vmap(grad), per-sample gradients"),
            ("GradOrth", "shallow", gradorth, lambda xx, m=model, b=gradorth.basis: loop_gradorth(m, xx, b),
             "per-sample loop"),
            ("Low-dim gradients", "shallow", lowdim, lambda xx, m=model, sc=lowdim: func_lowdim(m, xx, sc),
             "torch.func vmap(grad)"),
            ("Fisher trace", "shallow", get_score("fisher"), lambda xx, m=model: loop_fisher(m, xx, False),
             "per-sample loop, one backward per label"),
        ]
        paths = [(lambda xx, m=model: forward_backward(m, xx), x), (lambda xx, m=model: forward(m, xx), x)]
        for _, _, sc, slow, how in methods:  # per-sample loops and vmap on the first n_loop samples
            paths += [(lambda xx, sc=sc, m=model: sc.from_model(m, xx), x),
                      (slow, x if how.startswith("authors' batched") else x[:n_loop])]
        paths.append((lambda xx, m=model: forward(m, xx), x))  # the forward again, last: the faster of the two
        # (the first forward follows the largest frees); the MLP's paths take milliseconds: 4x the rounds
        rates, values = race(paths, args.repeats * (4 if name == "MLP" else 1), clock=time.process_time)
        fb, fw = rates[0], max(rates[1], rates[-1])
        rows.append((name, "one batched forward + backward", "", fb, float("nan"), 1.0))
        rows.append((name, "one batched forward (best of two places in the round)", "", fw, float("nan"), fb / fw))
        for j, (label, depth, _, _, how) in enumerate(methods):
            fast, slow = rates[2 + 2 * j], rates[3 + 2 * j]
            v_slow = values[3 + 2 * j]
            v_fast = values[2 + 2 * j][:len(v_slow)]
            checks.append((name, f"{label} {depth}", float(((v_fast - v_slow).abs() / v_slow.abs().clamp_min(1e-30))
                                                           .max())))
            rows.append((name, f"{label} ({depth})", how, slow, 1.0, fb / slow))
            rows.append((name, f"{label} ({depth})", "uvood fast path", fast, fast / slow, fb / fast))
    info = machine_info()
    lines = [f"Machine: {info['nproc']} CPUs ({info['cpu']}), torch {info['torch']}, {info['threads']} thread(s), "
             f"Python {info['python']}; best of {args.repeats} runs (MLP: {4 * args.repeats})"
             f"{' (--quick)' if args.quick else ''}, CPU time of "
             "this process (time.process_time: with one thread the wall time on an idle machine, far less disturbed "
             "by other jobs on a shared one); ratios compare paths measured in the same run.", "",
             "| model | method | path | samples/s | x authors' way | cost in batched forward+backward |",
             "|---|---|---|---:|---:|---:|"]
    for name, method, path, rate, ratio, cost in rows:
        r = "" if ratio != ratio else f"{ratio:.1f}x"
        lines.append(f"| {name} | {method} | {path} | {rate:,.0f} | {r} | {cost:.2f} |")
    lines += ["", "Cost: time per sample of the path divided by that of one batched forward + backward of the same "
              "model on the same batch (a forward alone is the second row).", "",
              "Agreement with the authors' way (max relative difference, float32): "
              + "; ".join(f"{m} {s}: {a:.1e}" for m, s, a in checks)]
    ratio = {(m, meth): r for m, meth, path, _, r, _ in rows if path == "uvood fast path"}
    cost = {(m, meth): c for m, meth, path, _, _, c in rows if path == "uvood fast path"}
    fwd = {m: c for m, meth, _, _, _, c in rows if meth.startswith("one batched forward (")}
    targets = [(m, meth, 10 if m == "MLP" else 1.5) for m, meth in ratio]
    # every path runs at least the forward pass that gives the logits: its ratio to the authors' way is at most
    # (time of the authors' way) / (time of one forward) = forward samples/s / authors' samples/s
    slow = {(m, meth): rate for m, meth, path, rate, r, _ in rows if r == 1.0}
    fw_rate = {m: rate for m, meth, _, rate, _, _ in rows if meth.startswith("one batched forward (")}
    bound = {key: fw_rate[key[0]] / slow[key] for key in ratio}
    lines += ["", "Targets (bound: the largest ratio to the authors' way of ANY path that runs one forward pass = "
              "forward samples/s / authors' samples/s; a target above it cannot be met against this baseline):"]
    lines += [f"- {m} {meth} >= {t}x: {ratio[(m, meth)]:.1f}x {'met' if ratio[(m, meth)] >= t else 'MISSED'} "
              f"(bound {bound[(m, meth)]:.1f}x: {'reachable' if bound[(m, meth)] >= t else 'IMPOSSIBLE'}; "
              f"measured = {ratio[(m, meth)] / bound[(m, meth)]:.0%} of the bound)" for m, meth, t in targets]
    lines += ["", "Shallow forms vs a forward pass (cost / forward cost; target about 1.1): " + "; ".join(
        f"{m} {meth}: {cost[(m, meth)] / fwd[m]:.2f}" for m, meth in cost if "shallow" in meth)]
    text = "\n".join(lines)
    print(text)
    if args.write:
        command = " ".join(["python benchmarks/since_speed.py"] + [a for a in sys.argv[1:] if a not in
                                                                    ("--write", str(args.write))])
        with open(args.write, "a") as f:
            f.write(f"\n## Gradient methods since the paper: speed (`{command}`)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
