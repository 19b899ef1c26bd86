"""What a cold ``uvood bench small`` must cost on this machine, from the per-image cost of each pass (issue 13).

    python benchmarks/bench_cost.py [--images 128] [--threads 1] [--repeats 2] [--benchmark small]

For every model of the benchmark, on ``--images`` evenly spaced test images of its ID set, in CPU time of
this process (one thread: the wall time of an idle machine), best of ``--repeats``:

* the forward alone (what feature extraction costs per image);
* the ONE fused deep pass of the bench (:func:`uvood.scores.fused.deep_pass`: every fusable deep row and the
  per-label norms), beside its bound: one forward and C batched parameter gradients of plain autograd
  (``bound`` of benchmarks/fused_pass.py), which computes less (no per-sample norm) than the pass must;
* every score that needs the model and is not fused (ODIN, GAIA, deep low-dim...), each in its own passes,
  as the runner computes it (:func:`uvood.score_model`).

The model scores are fitted first as the bench fits them (:data:`uvood.bench.runner.MODEL_FIT_N` training
images; cached in ``--cache-dir``), not timed here. Extrapolated to the benchmark's cold run: each model's
passes over the spec's ``n`` images of each of its sets, plus the forward over its ID training split (the
field's fitted detectors) and over its test sets (features). That CPU time divided by the machine's cores is
a LOWER bound of the cold run's wall time: perfect scaling over the cores, no data loading, no fits, no
metrics or bootstrap intervals, no figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_pass import bound  # noqa: E402
from gradient_scores import machine_info  # noqa: E402
from gradient_scores import race as wall_race  # noqa: E402
from uvood.api import score_model  # noqa: E402
from uvood.bench import runner  # noqa: E402
from uvood.bench.scoresets import rows_for  # noqa: E402
from uvood.bench.spec import load_spec  # noqa: E402
from uvood.features import model_fingerprint  # noqa: E402
from uvood.scores import fused, get_score  # noqa: E402

TARGET_S = 30 * 60  # issue 13: cold `uvood bench small` <= 30 min on this 2-core machine


def race(paths, repeats):
    return wall_race(paths, repeats, clock=time.process_time)


def model_costs(spec, id_name: str, model_name: str, images: int, repeats: int, cache: Path) -> dict:
    """Milliseconds per image of each pass of ``model_name`` (see the module docstring), and the set sizes."""
    model, _, in_shape = runner._load_model(model_name, spec)
    x = runner._prepare(spec, id_name, in_shape, spec.n, None).subset(spec.n, images).x
    scores = [get_score(full) for _, full, _ in rows_for(spec.groups, deep=spec.deep)]
    scores = list(dict.fromkeys(s for s in scores if s.needs_model))
    for s in scores:
        if s.needs_fit:
            runner.ModelFit(s, model, model_name, model_fingerprint(model), spec.datasets[id_name], in_shape,
                            None, cache, limit=runner.MODEL_FIT_N).ensure()
    fus = [s for s in scores if fused.fusable(s) and not runner._shares_label_norms(s)]
    temps = sorted({s.T for s in scores if runner._shares_label_norms(s)})
    C = model(x[:1]).shape[1]
    batch = runner.DEEP_BATCH_SIZE

    def chunks(fn, size):
        return lambda xx: [fn(xx[i:i + size]) for i in range(0, len(xx), size)]

    paths = {"forward": chunks(lambda xb: model(xb), 128),
             "fused deep pass": chunks(lambda xb: fused.deep_pass(model, xb, fus, label_norms=temps, batch_size=batch),
                                       batch),
             f"bound: forward + {C} backward (autograd, no per-sample norms)": chunks(lambda xb: bound(model, xb, C),
                                                                                      batch)}
    for s in scores:
        if not fused.fusable(s):
            paths[s.spec] = chunks(lambda xb, s=s: score_model(s, model, xb, batch_size=64, progress=False), 64)
    with torch.no_grad():
        fwd_rate, _ = race([(paths["forward"], x)], repeats)
    rates, _ = race([(fn, x) for name, fn in paths.items() if name != "forward"], repeats)
    ms = {"forward": 1000 / fwd_rate[0]}
    ms |= {name: 1000 / r for name, r in zip([n for n in paths if n != "forward"], rates)}
    sets = [id_name] + [o for i, o in spec.pairs if i == id_name]
    train = runner._prepare(spec, id_name, in_shape, 10**9, None,
                            ds={"dataset": spec.datasets[id_name]["dataset"],
                                "split": spec.datasets[id_name].get("train_split", "train")})
    return {"ms": ms, "sets": len(sets), "train_n": len(train.y), "C": C}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--benchmark", default="small")
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_spec(args.benchmark)
    cache = args.cache_dir or runner.default_cache_dir()
    info = machine_info()
    cores = os.cpu_count() or 1
    print(f"## What a cold `uvood bench {spec.name}` costs (`python benchmarks/bench_cost.py --images {args.images}"
          f" --threads {args.threads} --repeats {args.repeats}`)\n")
    print(f"Machine: {info['nproc']} CPUs ({info['cpu']}), torch {info['torch']}, {args.threads} thread(s); CPU time "
          f"of the process, best of {args.repeats}, on {args.images} test images of each model's ID set.\n")
    total_cpu, bound_cpu, lines = 0.0, 0.0, []
    for id_name, model_name in spec.models.items():
        c = model_costs(spec, id_name, model_name, args.images, args.repeats, cache)
        ms, n_model = c["ms"], c["sets"] * spec.n
        lines.append(f"\n### {model_name} (C = {c['C']}): {c['sets']} sets x {spec.n:,} images, training split "
                     f"{c['train_n']:,} images\n")
        lines.append("| pass | ms per image | x forward | images in the cold run | CPU s in the cold run |")
        lines.append("|---|---:|---:|---:|---:|")
        for name, v in ms.items():
            n_img = n_model + c["train_n"] if name == "forward" else n_model
            counted = not name.startswith("bound")
            cpu_s = v * n_img / 1000
            total_cpu += cpu_s if counted else 0.0
            bound_cpu += cpu_s if name.startswith(("bound", "forward")) else 0.0
            lines.append(f"| {name} | {v:.2f} | {v / ms['forward']:.1f} | {n_img:,} | "
                         f"{cpu_s:,.0f}{'' if counted else ' (not counted)'} |")
    print("\n".join(lines))
    floor = total_cpu / cores
    print(f"\nSum of the counted passes: {total_cpu:,.0f} CPU s at {args.threads} thread(s). On {cores} cores with "
          f"perfect scaling, a cold run cannot take less than **{floor / 60:.0f} min** (no data loading, fits, metrics "
          f"or figures counted). Target <= {TARGET_S // 60} min: "
          f"{'within reach' if floor <= TARGET_S else 'OUT OF REACH for these passes on this machine'}.")
    print(f"\nThe bounds alone (the forwards, and C backward passes of plain autograd where the fused pass runs, no "
          f"per-sample norm, no other model score): {bound_cpu:,.0f} CPU s, **{bound_cpu / cores / 60:.0f} min** on "
          f"{cores} cores: {'within' if bound_cpu / cores <= TARGET_S else 'beyond'} the target even for a pass at "
          "the bound.")


if __name__ == "__main__":
    main()
