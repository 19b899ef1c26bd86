"""Whole-command wall time of a warm ``uvood bench`` rerun, beside ``import torch`` in the same run (issue 13).

    python benchmarks/warm_bench.py [--benchmark small] [--cache-dir DIR] [--repeats 5] [--target 6]

What a user waits for when nothing changed: ``uvood bench NAME --cache-dir DIR --no-progress`` as a fresh
process (interpreter start, imports, cache reads, metrics memo, tables, report, exit), timed from outside
with the wall clock, ``--repeats`` times. The baseline, timed interleaved in the same run, is a fresh
``python -c "import torch"``: the floor no command of a torch toolkit can go below, and the part of the
time that this machine's load moves most.

The output goes to a temporary copy of ``results/NAME`` (so that the committed figures' memo is there and
nothing in the checkout changes); the rerun's ``results.csv`` and ``leaderboard.csv`` are compared with the
committed ones byte for byte. One untimed run comes first: it fills a cold cache (then the timing is of the
runs after it) and says how long it took.

``PYTHONDONTWRITEBYTECODE`` is reported: when it is set (as on this project's machines), Python compiles
uvood's modules from source at every start (about 0.3 s here), which an installed package does not.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wall(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", default="small")
    ap.add_argument("--cache-dir", default=None, help="the bench cache (default: $UVOOD_CACHE or ~/.cache/uvood)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--target", type=float, default=None, help="seconds (default: 6 for small, 10 for large)")
    args = ap.parse_args()
    target = args.target or {"small": 6.0, "large": 10.0}.get(args.benchmark, 10.0)
    env = dict(os.environ)
    reference = REPO / "results" / args.benchmark
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / args.benchmark
        shutil.copytree(reference, out)
        bench = [sys.executable, "-m", "uvood", "bench", args.benchmark, "--out", str(out), "--no-progress"]
        if args.cache_dir:
            bench += ["--cache-dir", args.cache_dir]
        first = wall(bench, env)
        torch_s, bench_s = [], []
        for _ in range(args.repeats):
            torch_s.append(wall([sys.executable, "-c", "import torch"], env))
            bench_s.append(wall(bench, env))
        same = {f: filecmp.cmp(reference / f, out / f, shallow=False) for f in ("results.csv", "leaderboard.csv")
                if (reference / f).exists()}
    print(f"uvood bench {args.benchmark}, whole command, wall clock, {args.repeats} runs after one untimed run "
          f"({first:.1f} s); PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '(unset)')}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print()
    print("| command | min s | median s | max s |")
    print("|---|---:|---:|---:|")
    rows = (("python -c \"import torch\" (baseline)", torch_s), (f"uvood bench {args.benchmark} (warm)", bench_s))
    for name, xs in rows:
        print(f"| {name} | {min(xs):.2f} | {statistics.median(xs):.2f} | {max(xs):.2f} |")
    print()
    print(f"warm rerun / import torch (medians): {statistics.median(bench_s) / statistics.median(torch_s):.2f}x; "
          f"outputs identical to the committed ones: "
          + ", ".join(f"{f} {'yes' if ok else 'NO'}" for f, ok in same.items()))
    worst = max(bench_s)
    print(f"Target warm <= {target:g} s: {'met' if worst <= target else 'MISSED'} "
          f"(slowest of {args.repeats} runs {worst:.2f} s, median {statistics.median(bench_s):.2f} s)")


if __name__ == "__main__":
    main()
