"""The fused deep pass against its bounds, and against the code before it (issue 13).

    python benchmarks/fused_pass.py [--repeats 3] [--threads 1] [--batch 128] [--quick] [--write benchmarks/RESULTS.md]

Models: the MLP and the CIFAR-style CNN of benchmarks/gradient_scores.py (random weights, eval
mode, float32). All ratios come from paths timed in this run, interleaved, best of ``--repeats``,
in CPU time of the process (one thread: the wall time of an idle machine; robust on a shared one):

* bound "forward + backward": one batched forward with grad and ONE ``torch.autograd.grad`` of
  <v, logits> w.r.t. every parameter (the batch's summed gradient); GradNorm's deep pass is compared
  with it;
* bound "forward + C backward": the same forward and C such gradients (one per label cotangent
  (e_k - p) / T, graph retained); deep ExGrad is compared with it;
* "before": today's code before this change (the engine of git revision ``BEFORE``, loaded from git
  into this process), for deep squared-l2 mean-of-norm, and the separate passes the benchmark made
  per data set (label norms l1 + l2sq, GradNorm, BatchGrad, the predicted-label norm-of-mean row)
  against ONE fused pass (:func:`uvood.scores.fused.deep_pass`);
* ghost factor: per CNN convolution, the ghost norm's and the per-sample kernel's time per
  multiply-add of the cost model (:meth:`uvood.scores.engine.ConvRule.ghost_cheaper`);
* blocks: per CNN convolution and K in (1, 10), the l1 of the per-sample weight gradients by the
  convolution's per-sample kernel and in cache-sized blocks (``ConvRule.reduce_blocked``), and the
  path the rule takes (``engine.BLOCK_ELEMENTS``).

The deep scores compared with a bound get the whole batch as ``batch_size``, as the bound holds it;
the engine's memory planner (``plan_micro_batch``: at most 1.2x what the plain forward + backward
holds) then picks the micro-batch, e.g. ExGrad at batch 64 on the CNN: 4 x 16 samples.

Peak memory: each job runs in a fresh process (``--rss-job``), which reports its peak resident
set (VmHWM, reset before the job); the baseline is the same process after building the model and
the batch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradient_scores import cnn, machine_info, mlp  # noqa: E402
from gradient_scores import race as cpu_race  # noqa: E402
from uvood.scores import conv_kernel, engine, fused, get_score  # noqa: E402
from uvood.scores.gradient import _logit_cotangents, mean_of_norm_from_label_norms  # noqa: E402

BEFORE = "ff610c4"  # the last commit before the fused pass
REPO = Path(__file__).resolve().parents[1]


def race(paths, repeats):
    """gradient_scores.race timed in CPU time of this process (``time.process_time``)."""
    return cpu_race(paths, repeats, clock=time.process_time)


def engine_before():
    """The engine module as it was at ``BEFORE`` (read with git), imported beside today's."""
    src = subprocess.run(["git", "show", f"{BEFORE}:src/uvood/scores/engine.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("uvood.scores._engine_before", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "uvood.scores"
    sys.modules[spec.name] = mod  # dataclasses look their module up
    exec(compile(src, f"{BEFORE}:engine.py", "exec"), mod.__dict__)
    return mod


def bound(model, x, K, T=1.0):
    """One forward with grad and K batched parameter gradients (K = 1: GradNorm's, K = C: ExGrad's bound)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        z = model(x)
        p = torch.softmax(z.detach() / T, 1)
        C = z.shape[1]
        for k in range(K):
            v = (torch.full_like(p, 1.0 / C) - p) / T if K == 1 else (torch.nn.functional.one_hot(
                torch.full((x.shape[0],), k), C).to(p.dtype) - p) / T
            torch.autograd.grad(z, params, v, retain_graph=k < K - 1)
    return z


def models(quick, batch):
    torch.manual_seed(0)
    s = 4 if quick else 1
    return {"MLP": (mlp().eval(), torch.rand(4 * batch // s, 1, 28, 28)),
            "CNN": (cnn().eval(), torch.rand(batch // s, 3, 32, 32))}


def fitted_batchgrad(model, shape):
    bg = get_score("batchgrad(depth=deep)")
    C = 10
    bg.fit(model, torch.rand(C * 3, *shape), torch.arange(C * 3) % C)
    return bg


def torch_conv(fn):
    """``fn`` run with the compiled convolution kernel switched off (torch's per-sample kernel, as before it)."""
    def run(*args):
        with mock.patch.object(conv_kernel, "ENABLED", False):
            return fn(*args)
    return run


def model_paths(model, x, old) -> list:
    """(label, fn(x)) of every path timed on ``model``."""
    gn, eg = get_score("gradnorm(depth=deep)"), get_score("exgrad(depth=deep)")
    sq = get_score("grad(label=uniform,agg=mean_of_norm,norm=l2sq,depth=deep)")
    for sc in (gn, eg, sq):
        sc.batch_size = x.shape[0]  # the whole batch, as the bound; the memory planner picks the micro-batch
    zero = get_score("grad(label=predicted,agg=norm_of_mean,norm=l2sq,depth=deep)")
    bg = fitted_batchgrad(model, x.shape[1:])
    cot = _logit_cotangents("uniform", "mean_of_norm", "none", 1.0, False)

    def sq_before(xx):
        norms, z = old.per_sample_grad_norms(model, xx, cot, norm="l2sq", batch_size=128)
        return mean_of_norm_from_label_norms(norms, z, label="uniform")

    def separate(xx):
        """What the benchmark ran per data set before: label norms, GradNorm, BatchGrad, the zero row."""
        old.per_sample_grad_norms(model, xx, cot, norm=("l1", "l2sq"), batch_size=128)
        old.per_sample_grad_norms(model, xx, _logit_cotangents("uniform", "norm_of_mean", "none", 1.0, False),
                                  norm="l1", batch_size=64)
        G = bg._anchor_gradient(model, None, xx.dtype, xx.device)
        old.per_sample_grad_norms(model, xx, _logit_cotangents("predicted", "mean_of_norm", "none", 1.0, False),
                                  norm="l1", offsets=G, batch_size=64)
        old.per_sample_grad_norms(model, xx, _logit_cotangents("predicted", "norm_of_mean", "none", 1.0, False),
                                  norm="l2sq", batch_size=64)

    return [("forward + backward", lambda xx: bound(model, xx, 1)),
            ("GradNorm deep", lambda xx: gn.from_model(model, xx)),
            ("forward + C backward", lambda xx: bound(model, xx, 10)),
            ("ExGrad deep", lambda xx: eg.from_model(model, xx)),
            ("GradNorm deep, torch's conv kernel", torch_conv(lambda xx: gn.from_model(model, xx))),
            ("ExGrad deep, torch's conv kernel", torch_conv(lambda xx: eg.from_model(model, xx))),
            ("squared-l2 mean-of-norm, before", sq_before),
            ("squared-l2 mean-of-norm, now", lambda xx: sq.from_model(model, xx)),
            ("bench's deep scores, separate passes (before)", separate),
            ("bench's deep scores, one fused pass", lambda xx: fused.deep_pass(model, xx, [gn, bg, zero],
                                                                               label_norms=(1.0,)))]


def speed(args, lines, results, lines_err):
    old = engine_before()
    for name, (model, x) in models(args.quick, args.batch).items():
        paths = model_paths(model, x, old)
        rates, values = race([(fn, x) for _, fn in paths], args.repeats)
        r = dict(zip([p for p, _ in paths], rates))
        labels = [p for p, _ in paths]
        now, before = values[labels.index("squared-l2 mean-of-norm, now")], values[labels.index(
            "squared-l2 mean-of-norm, before")]
        err = float(((now - before).abs() / before.abs()).max())
        for score in ("GradNorm", "ExGrad"):  # the compiled kernel's values against torch's kernel's
            a, b = values[labels.index(f"{score} deep")], values[labels.index(f"{score} deep, torch's conv kernel")]
            r_err = float(((a - b).abs() / b.abs()).max())
            lines_err.append(f"{name} {score} {r_err:.1e}")
        results[name] = {"rates": r, "sq_rel_diff": err}
        for p, rate in r.items():
            lines.append(f"| {name} | {p} | {rate:,.1f} |")
    return results


def conv_records(batch):
    """The benchmark CNN's convolutions (seeded) and each one's (input, output) on ``batch`` random images."""
    torch.manual_seed(0)
    model = cnn().eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    acts = {}
    hooks = [m.register_forward_hook(lambda m, i, o: acts.__setitem__(m, (i[0].detach(), o.detach()))) for m in convs]
    with torch.no_grad():
        model(torch.rand(batch, 3, 32, 32))
    for h in hooks:
        h.remove()
    return convs, acts


def ghost_factor(args, lines):
    """Seconds per cost-model multiply-add of the ghost norm and of the per-sample kernel (the compiled one where it
    runs: GHOST_FACTOR_COMPILED; else torch's: GHOST_FACTOR), per CNN conv."""
    convs, acts = conv_records(args.batch)
    K = 10
    rows = []
    for m in convs[2:]:  # the first two (T = 1024) are far on the kernel's side
        a, o = acts[m]
        g = torch.randn(o.shape[0], K, *o.shape[1:]).transpose(0, 1)  # sample-major, as the engine holds it
        T = o.shape[2] * o.shape[3]
        d, cout = m.weight[0].numel(), m.weight.shape[0]

        def kernel(_, m=m, a=a, g=g):
            inf = float("inf")  # the cost model never picks ghost
            with mock.patch.multiple(engine, GHOST_FACTOR=inf, GHOST_FACTOR_COMPILED=inf):
                return engine.ConvRule().norms(m, (a,), {}, g, ["weight"], "l2sq")

        def ghost(_, m=m, a=a, g=g):
            return engine.ConvRule.ghost_l2sq(m, a, g)

        (rk, rg), (vk, vg) = race([(kernel, a), (ghost, a)], args.repeats)
        tk, tg = a.shape[0] / rk, a.shape[0] / rg
        fk, fg = K * cout * d * T * a.shape[0], T * T * (d + K * cout) * a.shape[0]
        rel = float(((vg.double() - vk["weight"]).abs() / vk["weight"]).max())
        rows.append((tuple(m.weight.shape), T, tk, tg, (tg / fg) / (tk / fk), rel,
                     engine.ConvRule.ghost_cheaper(m, a, g)))
    lines += ["", "| conv (Cout, Cin, k, k) | T | kernel s | ghost s | kernel / ghost | ghost s per MAC / kernel s "
              "per MAC | max rel. diff | cost model picks |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for shape, T, tk, tg, factor, rel, pick in rows:
        lines.append(f"| {shape} | {T} | {tk:.3f} | {tg:.3f} | {tk / tg:.1f}x | {factor:.2f} | {rel:.1e} | "
                     f"{'ghost' if pick else 'kernel'} |")
    return rows


def block_table(args, lines):
    """Per CNN convolution and K (1: GradNorm, 10: ExGrad's labels): l1 of the per-sample weight gradients by the
    convolution's per-sample kernel (unblocked) and by cache-sized blocks (:meth:`ConvRule.reduce_blocked`), and
    the path the rule takes (BLOCK_ELEMENTS)."""
    convs, acts = conv_records(args.batch)
    rows = []
    for K in (1, 10):
        for m in convs:
            a, o = acts[m]
            g = torch.randn(o.shape[0], K, *o.shape[1:]).transpose(0, 1)  # sample-major, as the engine holds it

            @torch_conv
            def kernel(_, m=m, a=a, g=g):
                with mock.patch.object(engine, "BLOCK_ELEMENTS", float("inf")):
                    return engine.ConvRule().reduce(m, (a,), g, "weight", [("l1", None)])

            def blocked(_, m=m, a=a, g=g):
                return engine.ConvRule.reduce_blocked(m, a, g, [("l1", None)])

            def compiled(_, m=m, a=a, g=g):
                return conv_kernel.weight_norms(m, a, list(m.padding), g, [("l1", None)])

            paths = [(kernel, a), (blocked, a)] + ([(compiled, a)] if conv_kernel.available() else [])
            rates, vals = race(paths, args.repeats)
            vk = vals[0]
            rel = max(float(((v - vk).abs() / vk).max()) for v in vals[1:])
            times = [a.shape[0] / r for r in rates] + [float("nan")] * (3 - len(rates))
            rows.append((K, tuple(m.weight.shape), o.shape[2] * o.shape[3], *times, rel,
                         engine.ConvRule.blocked(m, a, g)))
    rule = "compiled" if conv_kernel.available() else None
    lines += ["", f"Per-sample l1 of conv weight gradients, batch {args.batch}: torch's per-sample kernel, cache-sized "
              f"blocks of it (BLOCK_ELEMENTS = {engine.BLOCK_ELEMENTS}) and the compiled kernel "
              f"(uvood.scores.conv_kernel, {conv_kernel.tag()}); max rel. diff of the others to torch's kernel:", "",
              "| K | conv (Cout, Cin, k, k) | T | torch kernel s | blocked s | compiled s | torch kernel / compiled "
              "| max rel. diff | rule takes |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for K, shape, T, tk, tb, tc, rel, pick in rows:
        lines.append(f"| {K} | {shape} | {T} | {tk:.3f} | {tb:.3f} | {tc:.3f} | {tk / tc:.2f}x | {rel:.1e} | "
                     f"{rule or ('blocked' if pick else 'kernel')} |")
    totals = {K: (sum(r[3] for r in rows if r[0] == K), sum(r[5] for r in rows if r[0] == K)) for K in (1, 10)}
    lines.append("")
    lines.append("Summed over the convolutions: " + "; ".join(
        f"K = {K}: torch kernel {tk:.3f} s, compiled {tc:.3f} s ({tk / tc:.2f}x)" for K, (tk, tc) in totals.items()))
    return rows


def _vm(field: str) -> float:
    """A field of /proc/self/status in MiB (VmHWM: peak resident set of this process image; VmRSS: now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_job(job, batch):
    """Run one job in this (fresh) process; print its resident memory before, and its peak during the job, MiB.

    The peak is VmHWM after resetting it (``echo 5 > /proc/self/clear_refs``): ``ru_maxrss`` would also count
    the parent's peak, which survives ``exec``."""
    torch.manual_seed(0)
    model, x = cnn().eval(), torch.rand(batch, 3, 32, 32)
    sc = get_score("exgrad(depth=deep)")
    sc.batch_size = batch  # the whole batch in one micro-batch, as the bound holds it
    with torch.no_grad():
        model(x[:2])
    Path("/proc/self/clear_refs").write_text("5")
    base = _vm("VmRSS")
    if job == "bound":
        bound(model, x, 10)
    else:
        sc.from_model(model, x)
    print(json.dumps({"base": base, "peak": _vm("VmHWM")}))


def rss(args, lines):
    out = {}
    for job in ("bound", "exgrad"):
        res = subprocess.run([sys.executable, __file__, "--rss-job", job, "--batch", str(args.rss_batch),
                              "--threads", str(torch.get_num_threads())], capture_output=True, text=True, check=True)
        out[job] = json.loads(res.stdout.strip().splitlines()[-1])
    b, e = out["bound"], out["exgrad"]
    lines += ["", f"Peak RSS on the CNN, batch {args.rss_batch} (fresh process each, MiB): forward + C backward "
              f"{b['peak']:.0f} (above the process after building model and batch: {b['peak'] - b['base']:.0f}); "
              f"deep ExGrad {e['peak']:.0f} ({e['peak'] - e['base']:.0f}); ratio of peaks "
              f"{e['peak'] / b['peak']:.2f}x, of increments "
              f"{(e['peak'] - e['base']) / max(1.0, b['peak'] - b['base']):.2f}x."]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rss-batch", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke test)")
    ap.add_argument("--write", type=Path, default=None, help="append the tables to this markdown file")
    ap.add_argument("--rss-job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_job:
        rss_job(args.rss_job, args.batch)
        return
    info = machine_info()
    lines = [f"Machine: {info['nproc']} CPUs ({info['cpu']}), torch {info['torch']}, {info['threads']} thread(s), "
             f"best of {args.repeats}, batch {args.batch} (CNN; MLP {4 * args.batch})"
             f"{' (--quick)' if args.quick else ''}; CPU time of the process (the machine was shared), ratios "
             "compare paths timed in the same run.", "", "| model | path | samples/s |", "|---|---|---:|"]
    lines_err: list[str] = []
    results = speed(args, lines, {}, lines_err)
    ghost_factor(args, lines)
    block_table(args, lines)
    mem = rss(args, lines)
    targets = []
    for name, res in results.items():
        r = res["rates"]
        targets += [(f"{name} deep GradNorm / (forward + backward)", r["GradNorm deep"] / r["forward + backward"],
                     0.95),
                    (f"{name} deep ExGrad / (forward + C backward)", r["ExGrad deep"] / r["forward + C backward"],
                     0.95),
                    (f"{name} deep GradNorm with torch's conv kernel / (forward + backward)",
                     r["GradNorm deep, torch's conv kernel"] / r["forward + backward"], None),
                    (f"{name} deep ExGrad with torch's conv kernel / (forward + C backward)",
                     r["ExGrad deep, torch's conv kernel"] / r["forward + C backward"], None)]
    c = results["CNN"]["rates"]
    targets += [("CNN squared-l2 mean-of-norm, now / before", c["squared-l2 mean-of-norm, now"]
                 / c["squared-l2 mean-of-norm, before"], 1.3),
                ("CNN bench deep scores, fused / separate", c["bench's deep scores, one fused pass"]
                 / c["bench's deep scores, separate passes (before)"], None)]
    peak = mem["exgrad"]["peak"] / mem["bound"]["peak"]
    targets.append(("CNN peak RSS, deep ExGrad / (forward + C backward)", peak, -1.3))
    lines += ["", "Ratios (target): " + "; ".join(
        f"{t} {v:.2f}x" + ("" if goal is None else f" (target {'<=' if goal < 0 else '>='} {abs(goal)}x: "
                                                 f"{'met' if (v <= -goal if goal < 0 else v >= goal) else 'MISSED'})")
        for t, v, goal in targets)]
    lines.append("Agreement, squared-l2 mean-of-norm now vs before (float32): max rel. diff "
                 + ", ".join(f"{n} {res['sq_rel_diff']:.1e}" for n, res in results.items()) + "; compiled conv "
                 "kernel vs torch's (float32): " + ", ".join(lines_err) + ".")
    text = "\n".join(lines)
    print(text)
    if args.write:
        command = " ".join(["python benchmarks/fused_pass.py"] + [a for a in sys.argv[1:] if a not in
                                                                  ("--write", str(args.write))])
        with open(args.write, "a") as f:
            f.write(f"\n## Fused deep pass, ghost norm, memory (`{command}`)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
