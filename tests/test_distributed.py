"""Sharded runs under torch.distributed (gloo, two CPU processes started here with torchrun's environment):
equal to one process, a rank that raises or dies stops the others with a clear error, a rerun after a
``kill -9`` computes only the missing parts. Each test starts its processes with one thread each."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import uvood
from uvood import distributed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(task: str, out: Path, cache: Path | None = None, ranks=(0, 1), world: int = 2, timeout_s: float = 20,
           wait_s: float = 90) -> list[int]:
    """Start ``ranks`` of a ``world``-rank group running ``dist_worker.py task``; return their exit codes."""
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "UVOOD_DIST_TIMEOUT": str(timeout_s),
           "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, str(HERE / "dist_worker.py"), task, str(out)] + ([str(cache)] if cache else [])
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in ranks]
    return [p.wait(timeout=wait_s) for p in procs]


def result(out: Path, task: str, rank: int) -> dict[str, np.ndarray]:
    with np.load(out / f"{task}-rank{rank}.npz") as f:
        return {k: f[k] for k in f.files}


def reference(task: str, cache_dir=None) -> dict[str, np.ndarray]:
    torch.set_num_threads(1)  # as the workers: the same kernels, so the same rounding
    return dist_worker.run(task, cache_dir)


def assert_close(got: dict, want: dict, keys) -> None:
    for k in keys:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=0, err_msg=k)


def test_features_gradient_and_fitted_scores_equal_one_process_on_every_rank(tmp_path):
    assert launch("scores", tmp_path) == [0, 0]
    want = reference("scores")
    assert {"h", "logits", "deep", "shallow", "batchgrad", "fitted", "fitted_threshold"} <= set(want)
    for rank in (0, 1):  # every rank holds the whole result, in the original order
        got = result(tmp_path, "scores", rank)
        assert set(got) == set(want)
        assert_close(got, {k: v for k, v in want.items() if k != "y"}, [k for k in want if k != "y"])
        np.testing.assert_array_equal(got["y"], want["y"])


def test_killed_rank_then_rerun_computes_only_the_missing_parts(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    cache.mkdir(), out.mkdir()
    codes = launch("kill", out, cache)
    assert codes[1] == -9
    assert codes[0] == 2
    err = (out / "rank0.err").read_text()
    assert "another rank stopped" in err and "rerun the same command" in err
    parts = sorted(p.name for p in cache.glob("*.part-*.npz"))
    # 60 samples in 15 batches of 4, 8 parts; rank 0 finished its 4, rank 1 one of its 4 before it died
    assert len(parts) == 5
    assert launch("cached", out, cache) == [0, 0]
    runs = [result(out, "cached", r) for r in (0, 1)]
    assert int(runs[0]["computed"]) + int(runs[1]["computed"]) == 60 - 4 * (8 + 2)  # the 3 missing parts only
    want = reference("features")
    for got in runs:
        assert_close(got, want, ("h", "logits"))
    assert not list(cache.glob("*.part-*.npz"))  # rank 0 saved the whole and removed the parts
    assert len(list(cache.glob("features-*.npz"))) == 1


def test_bad_inputs_and_a_rank_that_raises_give_a_clear_error_on_every_rank(tmp_path):
    assert launch("errors", tmp_path) == [0, 0]
    for rank in (0, 1):
        err = {k: str(v) for k, v in result(tmp_path, "errors", rank).items()}
        assert "The ranks disagree on the inputs of features" in err["mismatch"]
        assert "rank 0 vs rank 1" in err["mismatch"] and "model: " in err["mismatch"]
        assert "1 samples for 2 ranks: each rank needs at least one" in err["tiny"]
        assert "rank 1's model broke" in err["raise"]
        if rank == 0:
            assert "rank 1 of 2 failed during features" in err["raise"]
        assert f"uvood: {uvood.__version__!r} vs '9.9.9'" in err["version"]


def test_a_lone_rank_gives_up_after_the_timeout(tmp_path):
    assert launch("features", tmp_path, ranks=(0,), timeout_s=3, wait_s=60) == [2]
    err = (tmp_path / "rank0.err").read_text()
    assert "did not all join within 3 s" in err and "torchrun --nproc_per_node" in err


def test_parts_cover_every_batch_once_and_shares_are_contiguous():
    for n_batches in (1, 2, 7, 15, 64):
        for world in (1, 2, 3, 8):
            parts = distributed.part_ranges(n_batches, world)
            assert [b for b0, b1 in parts for b in range(b0, b1)] == list(range(n_batches))
            shares = [distributed.split(parts, world, r) for r in range(world)]
            assert [p for s in shares for p in s] == parts
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_without_a_process_group_nothing_is_sharded():
    assert distributed.rank_world() == (0, 1) and distributed.is_writer() and distributed.dist() is None
    assert distributed.all_gather({"a": 1}, "x") == [{"a": 1}]


def test_torchrun_uvood_score_writes_the_csv_of_one_process(tmp_path):
    from uvood.cli import main

    x = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 10)
    args = ["score", "--model", "mnist-mlp", "--data", str(tmp_path / "d.npz"), "--batch-size", "8",
            "--score", "gradnorm(depth=deep)", "--score", "norm(0.3)*energy"]
    torch.set_num_threads(1)
    assert main([*args, "--out", str(tmp_path / "one.csv")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "uvood", *args, "--out", str(tmp_path / "two.csv")], env=env, timeout=120,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    one = (tmp_path / "one.csv").read_text().splitlines()
    two = (tmp_path / "two.csv").read_text().splitlines()
    assert len(two) == 41 and two[0] == one[0]
    for a, b in zip(one[1:], two[1:]):
        fa, fb = a.split(","), b.split(",")
        assert fa[:4] == fb[:4]
        np.testing.assert_allclose([float(v) for v in fb[4:]], [float(v) for v in fa[4:]], rtol=1e-6, atol=0)


def test_a_feature_score_cached_on_one_rank_only_is_fitted_by_every_rank_together(tmp_path):
    """Rank 0 finds the fitted score's value cached, rank 1 does not: both fit it (the fit extracts the training
    features, a collective), so neither hangs nor fails, and both hold the same fitted values."""
    assert launch("fscores", tmp_path, tmp_path) == [0, 0]
    runs = [result(tmp_path, "fscores", r) for r in (0, 1)]
    np.testing.assert_array_equal(runs[0]["values"], runs[1]["values"])
    assert np.abs(runs[0]["values"]).min() > 0  # fitted values, not rank 0's cached placeholder zeros
    assert int(runs[0]["fit_images"]) + int(runs[1]["fit_images"]) == 60  # the extraction was shared


def test_torchrun_bench_shards_the_deep_passes_and_equals_one_process(tmp_path, data_dir):
    """Two gloo ranks run a tiny spec's deep rows (the fused deep pass, per-label norms, a product with a deep
    factor): every score equals one process's, and each rank pushed only its share of the images through the
    deep passes (the speed-up), together all of them once."""
    one = tmp_path / "one"
    one.mkdir()
    want = reference("bench", str(one))
    assert launch("bench", tmp_path, tmp_path, wait_s=300) == [0, 0]
    total = int(want["deep_images"])
    runs = [result(tmp_path, "bench", r) for r in (0, 1)]
    for got in runs:
        assert set(got) == set(want)
        assert_close(got, want, [k for k in want if k != "deep_images"])
    shares = [int(got["deep_images"]) for got in runs]
    assert sum(shares) == total and max(shares) < total  # split, not repeated
