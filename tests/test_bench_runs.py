"""Bench runs sharing a cache or an output folder: per-item locks, the timing history, Ctrl-C, progress."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch import nn

import uvood
from uvood.bench import runner
from uvood.bench.cli import append_history
from uvood.cache import claim
from uvood.scores.gradient import DEEP_BATCH_SIZE, deep_label_norms


def test_claim_makes_a_second_claimant_wait_until_release(tmp_path):
    item = tmp_path / "item.npz"
    held, order = threading.Event(), []

    def first():
        with claim(item):
            held.set()
            time.sleep(0.6)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    held.wait()
    t0 = time.time()
    with claim(item, poll_s=0.05):
        order.append("second in")
        waited = time.time() - t0
    t.join()
    assert order == ["first done", "second in"] and waited > 0.3
    assert not (tmp_path / "item.npz.lock").exists()


def test_stale_locks_are_taken_over(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "a.npz.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": 0}))
    t0 = time.time()
    with claim(tmp_path / "a.npz"):  # its owner is gone: taken over at once
        assert json.loads(lock.read_text())["pid"] != dead.pid
    lock.write_text(json.dumps({"pid": 1, "host": "another-host", "time": 0}))
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with claim(tmp_path / "a.npz", stale_s=60):  # another host's, older than stale_s
        pass
    assert time.time() - t0 < 5 and not lock.exists()


def test_lock_is_released_on_ctrl_c(tmp_path):
    with pytest.raises(KeyboardInterrupt, match="^$"):
        with claim(tmp_path / "x.npz"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_timing_history_keeps_every_record_of_concurrent_runs(tmp_path):
    path = tmp_path / "out" / "timings.json"

    def runs(who):
        for i in range(15):
            append_history(path, {"run": who, "i": i}, log=lambda *a: 0)

    threads = [threading.Thread(target=runs, args=(w,)) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = json.loads(path.read_text())
    assert sorted((h["run"], h["i"]) for h in history) == sorted((w, i) for w in "ab" for i in range(15))


def test_corrupt_timing_history_is_kept_aside_and_the_run_goes_on(tmp_path):
    path = tmp_path / "timings.json"
    path.write_text("[{'not': json")
    said = []
    history = append_history(path, {"total_s": 1.0}, log=said.append)
    assert history == [{"total_s": 1.0}] and json.loads(path.read_text()) == history
    assert (tmp_path / "timings.json.corrupt").read_text() == "[{'not': json"
    assert len(said) == 1 and "timings.json.corrupt" in said[0]


def test_chunked_progress_counts_images_and_keeps_the_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    x = torch.randn(2 * DEEP_BATCH_SIZE + 7, 6, dtype=torch.float64)
    totals, updates = [], []

    class Bar:
        def __init__(self, total=None, unit=None, **k):
            totals.append((total, unit))

        def update(self, n):
            updates.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    import tqdm.auto

    orig = tqdm.auto.tqdm
    tqdm.auto.tqdm = Bar
    try:
        parts = runner._chunked(lambda xb: deep_label_norms(model, xb), x, DEEP_BATCH_SIZE, True, "test")
    finally:
        tqdm.auto.tqdm = orig
    assert totals == [(x.shape[0], "img")] and updates == [DEEP_BATCH_SIZE, DEEP_BATCH_SIZE, 7]
    whole, logits = deep_label_norms(model, x)
    assert torch.equal(torch.cat([n["l1"] for n, _ in parts], dim=1), whole["l1"])
    assert torch.equal(torch.cat([z for _, z in parts]), logits)


def _mini(tmp_path):
    from test_bench import _mini_spec

    return _mini_spec(tmp_path, pairs=[["MNIST", "Fashion-MNIST"]])


def test_two_runs_on_one_cache_do_the_work_once(tmp_path, data_dir, monkeypatch):
    spec = _mini(tmp_path)
    computed, lock = [], threading.Lock()
    compute, from_features = uvood.features._compute, runner._from_features

    def count(what, fn):
        def wrapped(*a, **k):
            with lock:
                computed.append(what)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(uvood.features, "_compute", count("features", compute))
    monkeypatch.setattr(runner, "_from_features", count("score", from_features))
    results, errors = [], []

    def one_run():
        try:
            results.append(runner.run(spec, quick=True, data_dir=data_dir, cache_dir=tmp_path / "c", progress=False,
                                      log=lambda *a: 0, n_boot=20))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2
    n_scores = len(results[0].rows)
    assert computed.count("features") == 2 and computed.count("score") == 2 * n_scores  # 2 sets, once each
    assert [r["auroc"] for r in results[0].rows] == [r["auroc"] for r in results[1].rows]
    assert not list((tmp_path / "c").glob("*.lock"))


def test_interrupted_run_leaves_no_half_file_and_no_lock(tmp_path, data_dir, monkeypatch):
    spec = _mini(tmp_path)
    calls, from_features = [], runner._from_features

    def interrupt(sc, f):  # Ctrl-C in the middle of the feature scores
        calls.append(sc.spec)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return from_features(sc, f)

    monkeypatch.setattr(runner, "_from_features", interrupt)
    kw = dict(quick=True, data_dir=data_dir, cache_dir=tmp_path / "c", progress=False, log=lambda *a: 0, n_boot=20)
    with pytest.raises(KeyboardInterrupt, match="^$"):
        runner.run(spec, **kw)
    left = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert left and not [n for n in left if n.endswith((".lock", ".tmp"))], left
    monkeypatch.undo()
    assert len(runner.run(spec, **kw).rows) > 0
