"""Distributed speed and bounded memory.

    python benchmarks/distributed.py [--images 2000] [--memory 100000 1000000] [--bench 512] [--write FILE]

    # only the sharded `uvood bench` (one command; prints the ratio):
    python benchmarks/distributed.py --skip-speed --memory --api-memory --bench 512

Sharded bench (``--bench N``, 0 skips it): ``uvood bench`` of a one-model spec (the zoo's cifar10-cnn, CIFAR-10
test against MNIST test, N images each, every image through the deep rows ``gradnorm(depth=deep)``,
``exgrad(depth=deep)`` and ``grad(agg=mean_of_norm,depth=deep)``: one fused deep pass per set) with a fresh cache,
in one process with one thread, then under ``torchrun --nproc_per_node=2`` (one thread each; 512 images = 4
chunks of 128 per set, 2 per rank). The runner splits its chunks of images between the ranks
(:func:`uvood.distributed.map_shards`); the whole commands' wall times and the runner's fused-pass times are
compared, and the two ``results.csv`` must be identical.

Speed: deep GradNorm (``gradnorm(depth=deep)``, the engine) of the zoo's CIFAR-10 CNN over ``--images`` CIFAR-10
test images ($UVOOD_DATA; random images without it): one process with one thread, then
``torchrun --nproc_per_node=2`` (two processes with one thread each, gloo), which shards the batches
(:mod:`uvood.distributed`). Each run reports the time of the ``score_model`` call (after start-up and
rendezvous) and each rank its own share's time; the 2-process scores are checked against the
1-process ones (max relative difference). The whole command's wall time (start-up included) is given too.

Memory: ``uvood score --model mnist-mlp`` on synthetic MNIST-sized uint8 images (.npz written by np.savez,
uncompressed) of each ``--memory`` size; the peak resident memory (ru_maxrss) of the command, with
this version and, for the smallest size, with ``--baseline-src`` (the code before: it loads the whole
array and converts it to float32 at once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SPEC = "gradnorm(depth=deep)"


def _images(n: int) -> tuple[torch.Tensor, str]:
    from uvood.data.transforms import to_model_format

    if os.environ.get("UVOOD_DATA"):
        import uvood

        d = uvood.data.load("cifar10", "test", limit=n)
        return to_model_format(d.x, 3, 32), f"CIFAR-10 test, {n} evenly spaced images"
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g), f"{n} random images (UVOOD_DATA unset)"


def worker(n: int, out: str) -> None:
    """One rank (or the single process): score ``n`` images, time the call, save the scores (rank 0)."""
    torch.set_num_threads(1)
    import uvood
    from uvood import distributed

    distributed.init_from_env()
    model = uvood.zoo.load("cifar10-cnn")
    x, what = _images(n)
    rank, world = distributed.rank_world()
    t0 = time.perf_counter()
    s = uvood.score_model(SPEC, model, x, batch_size=64, progress=False)
    total = time.perf_counter() - t0
    times = distributed.all_gather({"rank": rank, "call_s": total, "compute_s": _compute_s[0]}, "timings")
    if distributed.is_writer():
        np.save(out + ".npy", s.numpy())
        Path(out + ".json").write_text(json.dumps({"world": world, "data": what, "ranks": times}))
    distributed.close()


_compute_s = [0.0]


def _patch_compute_timer() -> None:
    """Time each rank's own share: the sum of its batches' score computations (no waiting, no gather)."""
    from uvood.scores import registry

    for cls in {type(registry.get_score(SPEC))}:
        orig = cls.from_model

        def timed(self, *a, _orig=orig, **k):
            t = time.perf_counter()
            try:
                return _orig(self, *a, **k)
            finally:
                _compute_s[0] += time.perf_counter() - t

        cls.from_model = timed


def speed(n: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="uvood-dist-")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    runs = {}
    for world in (1, 2):
        out = f"{tmp}/w{world}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        cmd = (launcher if world > 1 else [sys.executable]) + [__file__, "--worker", out, "--images", str(n)]
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        runs[world] = {"wall_s": time.perf_counter() - t, **json.loads(Path(out + ".json").read_text()),
                       "scores": np.load(out + ".npy")}
    s1, s2 = runs[1]["scores"], runs[2]["scores"]
    return {"runs": runs, "max_rel_diff": float(np.max(np.abs(s2 - s1) / np.abs(s1))),
            "call_ratio": runs[1]["ranks"][0]["call_s"] / max(r["call_s"] for r in runs[2]["ranks"]),
            "wall_ratio": runs[1]["wall_s"] / runs[2]["wall_s"]}


BENCH_SCORES = ["gradnorm(depth=deep)", "exgrad(depth=deep)", "grad(agg=mean_of_norm,depth=deep)"]


def bench_speed(n: int) -> dict:
    """``uvood bench`` (fresh cache) in 1 process, then 2 under torchrun: wall times, fused-pass times, equal rows."""
    tmp = Path(tempfile.mkdtemp(prefix="uvood-dist-bench-"))
    spec = {"name": "dist-bench", "version": 1, "description": "benchmarks/distributed.py --bench",
            "datasets": {"CIFAR-10": {"dataset": "cifar10", "split": "test"}, "MNIST": {"dataset": "mnist",
                                                                                        "split": "test"}},
            "models": {"CIFAR-10": "cifar10-cnn"}, "pairs": [["CIFAR-10", "MNIST"]], "cross_domain": "resize",
            "n": n, "quick_n": n, "deep_n": n, "metric": {"tpr": 0.95, "fpr_positive": "id"}, "groups": ["table1"],
            "deep": True}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    runs = {}
    for world in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] \
            if world > 1 else [sys.executable]
        out = tmp / f"out{world}"
        cmd = launcher + ["-m", "uvood", "bench", str(tmp / "spec.json"), "--scores", *BENCH_SCORES,
                          "--cache-dir", str(tmp / f"cache{world}"), "--out", str(out), "--no-progress"]
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        record = json.loads((out / "timings.json").read_text())[-1]
        fused_s = sum(v for k, v in record["breakdown"].items() if k.endswith("fused deep pass"))
        runs[world] = {"wall_s": wall, "total_s": record["total_s"], "fused_s": fused_s,
                       "rows": (out / "results.csv").read_text()}
        print({"world": world, **{k: v for k, v in runs[world].items() if k != "rows"}}, flush=True)
    return {"n": n, "runs": runs, "identical": runs[1]["rows"] == runs[2]["rows"],
            "wall_ratio": runs[1]["wall_s"] / runs[2]["wall_s"],
            "fused_ratio": runs[1]["fused_s"] / max(runs[2]["fused_s"], 1e-9),
            "total_ratio": runs[1]["total_s"] / runs[2]["total_s"]}


def memory(sizes: list[int], baseline_src: str | None) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="uvood-mem-"))
    rows = []
    for n in sizes:
        path = tmp / f"mnist{n}.npz"
        rng = np.random.default_rng(0)
        x = np.empty((n, 28, 28), np.uint8)
        for i in range(0, n, 100_000):  # written in blocks: the writer's own memory stays small too
            x[i:i + 100_000] = rng.integers(0, 256, (min(100_000, n - i), 28, 28), dtype=np.uint8)
        np.savez(path, x=x)
        del x
        for label, src in [("this version", str(ROOT / "src"))] + (
                [("before (loads all)", baseline_src)] if baseline_src and n == min(sizes) else []):
            code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
                    "r = subprocess.run(sys.argv[1:]); "
                    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t, "
                    "r.returncode)")
            cli = "import sys; from uvood.cli import main; sys.exit(main())"  # also for code without __main__.py
            cmd = [sys.executable, "-c", code, sys.executable, "-c", cli, "score", "--model", "mnist-mlp",
                   "--data", str(path), "--score", "norm(0.3)*energy", "--out", str(tmp / "s.csv")]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": src}
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            kb, secs, rc = res.stdout.split()[-3:]
            rows.append({"n": n, "code": label, "peak_rss_mb": int(kb) / 1024, "seconds": float(secs),
                         "rc": int(rc), "file_mb": path.stat().st_size / 2**20})
            print(rows[-1], flush=True)
        path.unlink()
    return rows


API_CODE = """
import resource, sys, time, torch
from torch.utils.data import DataLoader, Dataset
import uvood

class Synthetic(Dataset):  # MNIST-sized uint8 images made on the fly: nothing of the data set is held
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=g), i % 10

torch.set_num_threads(1)
n = int(sys.argv[1])
det = uvood.Detector(uvood.zoo.load("mnist-mlp"), score="mahalanobis", batch_size=256)
det.fit(DataLoader(Synthetic(5000), batch_size=256), progress=False)
t = time.perf_counter()
s = det.score(DataLoader(Synthetic(n), batch_size=256), progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t, len(s))
"""


def api_memory(sizes: list[int]) -> list[dict]:
    """Peak RSS of Detector(mahalanobis).fit on 5,000 images, then .score over a DataLoader of n images."""
    rows = []
    for n in sizes:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        res = subprocess.run([sys.executable, "-c", API_CODE, str(n)], env=env, capture_output=True, text=True,
                             check=True)
        kb, secs, count = res.stdout.split()[-3:]
        rows.append({"n": n, "code": "Detector.score(DataLoader)", "peak_rss_mb": int(kb) / 1024,
                     "seconds": float(secs), "rc": 0, "file_mb": 0.0})
        print(rows[-1], flush=True)
    return rows


def report(sp: dict | None, mem: list[dict], n: int, bs: dict | None = None) -> str:
    lines = [f"\n## Distributed runs and bounded memory (benchmarks/distributed.py, {time.strftime('%Y-%m-%d')})\n",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
             f"torch {torch.__version__}."]
    if sp:
        r1, r2 = sp["runs"][1], sp["runs"][2]
        lines += ["", f"Deep GradNorm (`{SPEC}`), zoo `cifar10-cnn`, {r1['data']}, batch 64, float32, 1 thread per "
                  "process, gloo:", "",
                  "| run | score_model call (s) | per rank: own batches (s) | whole command (s) |", "|---|---|---|---|",
                  f"| 1 process | {r1['ranks'][0]['call_s']:.1f} | {r1['ranks'][0]['compute_s']:.1f} | "
                  f"{r1['wall_s']:.1f} |",
                  f"| torchrun, 2 processes | {max(r['call_s'] for r in r2['ranks']):.1f} | "
                  + " / ".join(f"{r['compute_s']:.1f}" for r in r2["ranks"]) + f" | {r2['wall_s']:.1f} |", "",
                  f"Speed-up of the call: **{sp['call_ratio']:.2f}x** (whole command, start-up and rendezvous "
                  f"included: {sp['wall_ratio']:.2f}x); scores of 2 processes vs 1: max relative difference "
                  f"{sp['max_rel_diff']:.1e}."]
    if bs:
        r1, r2 = bs["runs"][1], bs["runs"][2]
        lines += ["", f"`uvood bench` of cifar10-cnn, CIFAR-10 vs MNIST, {bs['n']} images per set, deep rows "
                  f"{', '.join(BENCH_SCORES)}, fresh cache, 1 thread per process, gloo:", "",
                  "| run | fused deep passes (s) | runner total (s) | whole command (s) |", "|---|---|---|---|",
                  f"| 1 process | {r1['fused_s']:.1f} | {r1['total_s']:.1f} | {r1['wall_s']:.1f} |",
                  f"| torchrun, 2 processes | {r2['fused_s']:.1f} | {r2['total_s']:.1f} | {r2['wall_s']:.1f} |", "",
                  f"Speed-up: fused deep passes **{bs['fused_ratio']:.2f}x**, runner {bs['total_ratio']:.2f}x, whole "
                  f"command {bs['wall_ratio']:.2f}x; results.csv of 2 processes identical to 1: {bs['identical']}."]
    if mem:
        lines += ["", "Peak resident memory of `uvood score --model mnist-mlp --score 'norm(0.3)*energy'` on synthetic "
                  "MNIST-sized uint8 images (uncompressed .npz), 1 thread:", "",
                  "| images | .npz (MB) | code | peak RSS (MB) | time (s) |", "|---|---|---|---|---|"]
        lines += [f"| {r['n']:,} | {r['file_mb']:.0f} | {r['code']} | {r['peak_rss_mb']:.0f} | {r['seconds']:.0f} |"
                  if r["file_mb"] else f"| {r['n']:,} | (made on the fly) | {r['code']} | {r['peak_rss_mb']:.0f} | "
                  f"{r['seconds']:.0f} |" for r in mem]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--memory", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--api-memory", type=int, nargs="*", default=[100_000, 1_000_000],
                    help="images scored by Detector.score over a DataLoader (peak RSS)")
    ap.add_argument("--baseline-src", help="a src folder of the code before, for the memory comparison")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--bench", type=int, default=512, metavar="N",
                    help="images per set of the sharded `uvood bench` comparison (0: skip it)")
    ap.add_argument("--write", help="append the section to this file (e.g. benchmarks/RESULTS.md)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _patch_compute_timer()
        worker(args.images, args.worker)
        return
    sp = None if args.skip_speed else speed(args.images)
    if sp:
        print(json.dumps({k: v for k, v in sp.items() if k != "runs"}), flush=True)
    bs = bench_speed(args.bench) if args.bench else None
    if bs:
        print(json.dumps({k: v for k, v in bs.items() if k != "runs"}), flush=True)
    mem = memory(args.memory, args.baseline_src) if args.memory else []
    mem += api_memory(args.api_memory)
    text = report(sp, mem, args.images, bs)
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
