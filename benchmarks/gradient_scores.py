"""Speed of the gradient scores: per-sample loop vs torch.func vs uvood's engine vs closed form.

    python benchmarks/gradient_scores.py [--quick] [--repeats 3] [--threads N] [--write benchmarks/RESULTS.md]

Models (random weights, eval mode; defined here, not imported from the zoo):
* MNIST-style MLP 784-256-256-10, ReLU + dropout 0.2;
* CIFAR-style CNN, the paper's family [c, c, M, 2c, 2c, M, 4c, 4c, M, (8c pad 0), M] of 3x3
  convs, each followed by BatchNorm2d(affine=False) (random running statistics) and ReLU,
  then a linear head on 8c features; c = 32 as in the zoo.

Paths, all in float32 and computing the same numbers (checked against each other):
* loop: what peers do, one sample at a time: forward, ``loss.backward()`` (GradNorm: one
  backward of the KL-to-uniform loss; ExGrad: one backward per label k of log p^(k)), norms of
  ``p.grad`` summed over parameters;
* torch.func: ``vmap(grad)`` (GradNorm) or ``vmap(jacrev)`` (ExGrad) of ``functional_call``
  over samples, norms of the per-sample gradients;
* engine: ``uvood`` deep scores (one batched forward + backward, per-layer rules);
* closed form: ``uvood`` shallow scores (forward + Eq. 4 / Eq. 5);
* official loop: the official GradNorm code's shallow score (per sample: forward, loss vs
  targets of ones, backward, L1 of the head's weight gradient).

Samples/s is the best of ``--repeats`` runs (the machine is shared); ratios are computed
from numbers measured in this run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from uvood.scores import get_score
from uvood.scores.reference import official_gradnorm_loop


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 256),
                         nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10))


def cnn(c: int = 32) -> nn.Module:
    layers: list[nn.Module] = []
    width = 3
    for item in [c, c, "M", 2 * c, 2 * c, "M", 4 * c, 4 * c, "M", (8 * c, 0), "M"]:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        out, pad = item if isinstance(item, tuple) else (item, 1)
        bn = nn.BatchNorm2d(out, affine=False)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        layers += [nn.Conv2d(width, out, 3, padding=pad), bn, nn.ReLU()]
        width = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width, 10))


def _norm(t, norm="l1"):
    return t.abs().sum() if norm == "l1" else (t * t).sum()


def loop_gradnorm(model, x, T=1.0):
    """Deep GradNorm, peer style: per sample, KL(u || p) backward, L1 of all parameter gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for n in range(x.shape[0]):
        model.zero_grad()
        logp = torch.log_softmax(model(x[n:n + 1]) / T, dim=1)
        loss = -logp.mean()  # KL(u || p) up to a constant
        loss.backward()
        out.append(float(sum(_norm(p.grad) for p in params)))
    return torch.tensor(out, dtype=torch.float64)


def loop_exgrad(model, x, T=1.0):
    """Deep ExGrad, peer style: per sample and label k, backward of log p^(k); sum_k p_k ||grad||_1."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for n in range(x.shape[0]):
        logp = torch.log_softmax(model(x[n:n + 1]) / T, dim=1)[0]
        p = logp.detach().exp()
        total = 0.0
        for k in range(logp.shape[0]):
            model.zero_grad()
            logp[k].backward(retain_graph=k < logp.shape[0] - 1)
            total += float(p[k]) * float(sum(_norm(q.grad) for q in params))
        out.append(-total)
    return torch.tensor(out, dtype=torch.float64)


def func_gradnorm(model, x, T=1.0, chunk=32):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(prm, xn):
        return -torch.log_softmax(functional_call(model, prm, (xn.unsqueeze(0),)) / T, dim=1).mean()

    g = vmap(grad(loss), in_dims=(None, 0))
    outs = []
    for lo in range(0, x.shape[0], chunk):
        gs = g(params, x[lo:lo + chunk])
        outs.append(sum(v.flatten(1).abs().sum(1) for v in gs.values()).double())
    return torch.cat(outs)


def func_exgrad(model, x, T=1.0, chunk=8):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logp(prm, xn):
        return torch.log_softmax(functional_call(model, prm, (xn.unsqueeze(0),))[0] / T, dim=0)

    jac = vmap(jacrev(logp), in_dims=(None, 0))
    outs = []
    for lo in range(0, x.shape[0], chunk):
        xb = x[lo:lo + chunk]
        J = jac(params, xb)
        norms = sum(v.flatten(2).abs().sum(2) for v in J.values()).double()  # n x C
        with torch.no_grad():
            p = torch.softmax(model(xb).double() / T, dim=1)
        outs.append(-(p * norms).sum(1))
    return torch.cat(outs)


def race(paths, repeats, clock=time.perf_counter):
    """Time every (fn, x) of ``paths`` in interleaved rounds after a warm-up; best samples/s of each.

    Interleaving keeps the paths of one comparison under the same background load. ``clock``: wall time by
    default; ``time.process_time`` (CPU time of this process) is far less disturbed by other jobs on a shared
    machine and, with one thread, equals the wall time on an idle one.
    """
    for fn, x in paths:
        fn(x[:2])
    best = [float("inf")] * len(paths)
    values = [None] * len(paths)
    for _ in range(repeats):
        for i, (fn, x) in enumerate(paths):
            t = clock()
            values[i] = fn(x)
            best[i] = min(best[i], clock() - t)
    return [x.shape[0] / b for (_, x), b in zip(paths, best)], values


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke test)")
    ap.add_argument("--write", type=Path, default=None, help="append the table to this markdown file")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = 4 if args.quick else 1
    models = {"MLP": (mlp().eval(), torch.rand(512 // s, 1, 28, 28), 64 // s, 32 // s),
              "CNN": (cnn().eval(), torch.rand(128 // s, 3, 32, 32), 32 // s, 8 // s)}
    rows = []  # (model, score, path, samples/s, ratio vs its baseline)
    checks = []
    for name, (model, x, n_loop, n_func) in models.items():
        gn_deep, eg_deep = get_score("gradnorm(depth=deep)"), get_score("exgrad(depth=deep)")
        gn_shallow, eg_shallow = get_score("gradnorm"), get_score("exgrad")
        for score, loop, func, engine in (("GradNorm deep", loop_gradnorm, func_gradnorm, gn_deep),
                                          ("ExGrad deep", loop_exgrad, func_exgrad, eg_deep)):
            (base, f_rate, e_rate), (v_loop, v_func, v_eng) = race(
                [(lambda xx, f=loop, m=model: f(m, xx), x[:n_loop]), (lambda xx, f=func, m=model: f(m, xx), x[:n_func]),
                 (lambda xx, sc=engine, m=model: sc.from_model(m, xx), x)], args.repeats)
            ref = v_loop[:n_func]
            checks.append((name, score, float(((v_func - ref).abs() / ref.abs()).max()),
                           float(((v_eng[:n_loop] - v_loop).abs() / v_loop.abs()).max())))
            rows += [(name, score, "per-sample loop (float32)", base, 1.0),
                     (name, score, "torch.func vmap", f_rate, f_rate / base),
                     (name, score, "uvood engine", e_rate, e_rate / base)]
        shallow = [("GradNorm shallow", gn_shallow), ("ExGrad shallow", eg_shallow),
                   ("GradNorm shallow (official)", get_score("gradnorm(official=true)"))]
        paths = [(lambda xx, sc=sc, m=model: sc.from_model(m, xx), x) for _, sc in shallow]
        if name == "CNN":
            paths.append((lambda xx, m=model: official_gradnorm_loop(m, xx, copy_model=False), x[:n_loop]))
        rates, values = race(paths, args.repeats)
        if name == "CNN":
            base, v_off = rates[-1], values[-1]
            checks.append((name, "GradNorm official shallow", float("nan"),
                           float(((values[2][:n_loop] - v_off).abs() / v_off.abs()).max())))
            rows.append((name, "GradNorm shallow (official)", "official per-sample loop", base, 1.0))
        for (label, _), rate in zip(shallow, rates):
            rows.append((name, label, "uvood closed form", rate, rate / base if name == "CNN" else float("nan")))
    info = machine_info()
    lines = [f"Machine: {info['nproc']} CPUs ({info['cpu']}), torch {info['torch']}, "
             f"{info['threads']} threads, Python {info['python']}; best of {args.repeats} runs"
             f"{' (--quick)' if args.quick else ''}. The machine was shared with a training job, so absolute "
             "numbers are noisy; ratios compare paths measured in the same run.",
             "",
             "| model | score | path | samples/s | x baseline |",
             "|---|---|---|---:|---:|"]
    for name, score, path, rate, ratio in rows:
        r = "" if ratio != ratio else f"{ratio:.1f}x"
        lines.append(f"| {name} | {score} | {path} | {rate:,.0f} | {r} |")
    lines += ["", "Baseline: the per-sample loop of the same score (shallow rows on the CNN: the official "
              "per-sample GradNorm loop).", "",
              "Agreement (max relative difference, float32): "
              + "; ".join(f"{m} {s}: " + ("" if a != a else f"torch.func {a:.1e}, ")
                          + f"engine/closed form {b:.1e}" for m, s, a, b in checks)]
    ratio = {(m, sc, path): r for m, sc, path, _, r in rows}
    targets = [("MLP", "GradNorm deep", "uvood engine", 15), ("CNN", "GradNorm deep", "uvood engine", 1.5),
               ("MLP", "ExGrad deep", "uvood engine", 30), ("CNN", "ExGrad deep", "uvood engine", 1.3),
               ("CNN", "GradNorm shallow", "uvood closed form", 2), ("CNN", "ExGrad shallow", "uvood closed form", 2)]
    lines += ["", "Targets (ratio to the baseline): " + "; ".join(
        f"{m} {sc} >= {t}x: {ratio[(m, sc, path)]:.1f}x {'met' if ratio[(m, sc, path)] >= t else 'MISSED'}"
        for m, sc, path, t in targets)]
    text = "\n".join(lines)
    print(text)
    if args.write:
        new_file = not args.write.exists()
        command = " ".join(["python benchmarks/gradient_scores.py"] + [a for a in sys.argv[1:] if a != "--write"
                                                                        and a != str(args.write)])
        with open(args.write, "a") as f:
            if new_file:
                f.write("# Benchmark results\n")
            f.write(f"\n## Gradient scores (`{command}`)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
