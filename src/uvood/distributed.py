"""Sharded runs under ``torch.distributed`` (launched by ``torchrun``): split, compute, gather, in order.

    torchrun --nproc_per_node=2 -m uvood score --model cifar10-cnn --data x.npz --score grad(...) --out s.csv

The data layer shards itself: :func:`uvood.features.extract` and :func:`uvood.score_model` call
:func:`map_batches`, which, when a process group is initialised (``torch.distributed.is_initialized()``)
with more than one rank, does the following:

1. The batches of the data (the same batches one process would use, so every sample is computed in
   the same batch as in a single process and the results are equal to it) are grouped into *parts*
   of consecutive batches (:func:`part_ranges`); the parts are split into one contiguous run per
   rank (:func:`split`). Part boundaries never cut a batch.
2. Every rank checks with the others, before any work, that they run the same uvood and torch
   versions, the same model (:func:`uvood.features.model_fingerprint`) and data of the same size
   (:func:`check_same`).
3. Each rank computes its parts. With a cache, each part is saved atomically as it finishes
   (``<name>.part-B0-B1.npz``, verified like every cache file), so a rerun after a rank was
   killed reads the finished parts and computes only the missing ones; rank 0 decides which are
   missing and tells the others (one broadcast), so every rank agrees.
4. One ``all_gather_object`` exchanges every rank's results (or its error): every rank then holds
   the full result in the original order. A rank that raised makes every rank raise
   :class:`~uvood.errors.UvoodError` naming it; a rank that died (``kill -9``) breaks the
   connection and the others raise at once; a rank that hangs is given up after the process
   group's timeout (:data:`TIMEOUT_S`, ``UVOOD_DIST_TIMEOUT``).

Only rank 0 writes output files (CSV, reports, full caches, :func:`is_writer`); part files are the
one exception, each written by the rank that computed it. Fitted statistics are computed from the
gathered (full) data on every rank, hence equal on all ranks; :func:`broadcast_state` copies rank
0's state to the others where a fit draws random samples, so that it cannot depend on the rank.

Scaling: the work is split by batches, so with N ranks the time is the slowest rank's share plus
one gather, about T_1 / N + (start-up, gather) (measured in benchmarks/distributed.py).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import UvoodError

#: seconds a rank waits for the others (rendezvous and every collective) before giving up
TIMEOUT_S = float(os.environ.get("UVOOD_DIST_TIMEOUT", 1800))

#: parts per rank: a killed rank loses at most one part per rank of work
PARTS_PER_RANK = 4


#: > 0 while a rank computes its own batches (:func:`local`): nested calls then run unsharded
_LOCAL = [0]


def _group():
    import torch.distributed as d

    if d.is_available() and d.is_initialized() and d.get_world_size() > 1:
        return d
    return None


def dist():
    """``torch.distributed`` when a process group with more than one rank is initialised (and this call is
    not nested in a rank's own share of work, :func:`local`), else None."""
    return None if _LOCAL[0] else _group()


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within it, uvood's entry points run on this rank's inputs alone, without splitting them again."""
    _LOCAL[0] += 1
    try:
        yield
    finally:
        _LOCAL[0] -= 1


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process for sharding: (0, 1) without a process group or inside :func:`local`."""
    d = dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def is_writer() -> bool:
    """True on the rank that writes output files: rank 0 of the process group (or a process without one)."""
    d = _group()
    return d is None or d.get_rank() == 0


def launched() -> bool:
    """True when this process was started by ``torchrun`` (or an equivalent) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: str | None) -> str | None:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun; anything else as given."""
    if device == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def init_from_env(device: str | None = None, timeout_s: float | None = None) -> None:
    """Initialise the process group from torchrun's environment (``MASTER_ADDR``, ``RANK``, ...).

    Backend: gloo for CPU tensors (every exchange of uvood's is on CPU), plus NCCL when the device
    is CUDA. A rank whose peers do not all arrive within ``timeout_s`` gets a clear error, not a hang.
    """
    import torch.distributed as d

    if not launched() or d.is_initialized():
        return
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    backend = "cpu:gloo,cuda:nccl" if device and device.startswith("cuda") else "gloo"
    if backend != "gloo":
        torch.cuda.set_device(torch.device(device))  # NCCL: this rank's GPU
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", 0))
    try:
        d.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - rendezvous failures come as several error types
        raise UvoodError(f"rank {rank} of {world}: the ranks did not all join within {timeout_s:.0f} s "
                         f"({_first_line(e)}). Start every rank "
                         "with the same command (torchrun --nproc_per_node=N -m uvood ...; on several nodes the "
                         "same --rdzv-endpoint on each), or raise UVOOD_DIST_TIMEOUT.") from None
    check_same({"uvood": _version(), "torch": torch.__version__}, "package versions")


def _version() -> str:
    from . import __version__

    return __version__


def close() -> None:
    """Destroy the process group initialised by :func:`init_from_env` (no-op without one)."""
    import torch.distributed as d

    if d.is_available() and d.is_initialized():
        d.destroy_process_group()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _lost(e: Exception, what: str) -> UvoodError:
    rank, world = rank_world()
    return UvoodError(f"rank {rank} of {world}: another rank stopped (it died, was killed or timed out after "
                      f"{TIMEOUT_S:.0f} s) during {what} ({_first_line(e)}). "
                      "Parts that finished are cached when a cache folder is used: rerun the same command to "
                      "compute only the rest.")


def all_gather(obj, what: str) -> list:
    """Every rank's ``obj`` (picklable), in rank order; a lost rank raises :class:`UvoodError`."""
    d = dist()
    if d is None:
        return [obj]
    out = [None] * d.get_world_size()
    try:
        d.all_gather_object(out, obj)
    except RuntimeError as e:
        raise _lost(e, what) from None
    return out


def broadcast(obj, what: str):
    """Rank 0's ``obj`` on every rank."""
    d = dist()
    if d is None:
        return obj
    box = [obj]
    try:
        d.broadcast_object_list(box, src=0)
    except RuntimeError as e:
        raise _lost(e, what) from None
    return box[0]


def check_same(values: dict, what: str) -> None:
    """Raise on every rank when ``values`` differ between ranks (versions, model fingerprints, data sizes)."""
    got = all_gather(values, f"the check of {what}")
    for r, v in enumerate(got):
        if v != got[0]:
            diff = {k: (got[0].get(k), v.get(k)) for k in set(got[0]) | set(v) if got[0].get(k) != v.get(k)}
            raise UvoodError(f"The ranks disagree on {what}: rank 0 vs rank {r}: "
                             + "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in sorted(diff.items()))
                             + ". Run every rank with the same installation, model weights and data.")


def broadcast_state(score) -> None:
    """Copy rank 0's fitted state of ``score`` (and of each factor of a product) to every rank."""
    if dist() is None:
        return
    state = broadcast({k: v.detach().cpu() for k, v in score.state().items()}, "the broadcast of fitted statistics")
    if state:
        score.load_state(state)


# ---------------------------------------------------------------- the sharded map


def part_ranges(n_batches: int, world: int) -> list[tuple[int, int]]:
    """Batch ranges [b0, b1) of the parts: about :data:`PARTS_PER_RANK` per rank, consecutive, covering
    every batch once."""
    parts = max(1, min(n_batches, PARTS_PER_RANK * world))
    size = math.ceil(n_batches / parts)
    return [(b, min(b + size, n_batches)) for b in range(0, n_batches, size)]


def split(items: list, world: int, rank: int) -> list:
    """Rank ``rank``'s contiguous share of ``items`` (shares differ in length by at most one)."""
    q, r = divmod(len(items), world)
    lo = rank * q + min(rank, r)
    return items[lo:lo + q + (rank < r)]


def _n_batches(data, batch_size: int) -> int:
    from .batching import data_length, is_sliceable

    if is_sliceable(data):
        return math.ceil(data_length(data) / batch_size)
    try:
        return len(data)
    except TypeError:
        raise UvoodError(f"Under torchrun the data must have a known length to be split between ranks: got "
                         f"{type(data).__name__} without len(). Pass a tensor, an (x, y) pair or a DataLoader "
                         "over a map-style data set.") from None


def _batches_in(data, batch_size: int, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, tuple]]:
    """(batch index, (x, y)) of the batches in ``ranges``: slices of a tensor, or the wanted batches of a loader."""
    from .batching import is_sliceable, iter_batches, slice_data

    if is_sliceable(data):
        for b0, b1 in ranges:
            yield from ((b0 + i, xy) for i, xy in
                        enumerate(iter_batches(slice_data(data, b0 * batch_size, b1 * batch_size), batch_size)))
        return
    wanted = {b for b0, b1 in ranges for b in range(b0, b1)}
    for b, xy in enumerate(iter_batches(data, batch_size)):
        if b in wanted:
            yield b, xy


class _Rows:
    """Named arrays appended batch by batch into one buffer per name (``capacity`` rows when known, doubled when
    exceeded). Keeping one buffer instead of a list of small per-batch arrays matters for memory: small
    long-lived arrays between the large short-lived ones of each batch fragment the C heap, whose resident
    size then grows with the number of batches (measured: ~30 KB per batch; benchmarks/distributed.py)."""

    def __init__(self, capacity: int | None = None):
        self.n, self.capacity, self.buf = 0, capacity or 0, {}

    def add(self, chunk: dict[str, np.ndarray] | None) -> None:
        if not chunk:
            return
        k = len(next(iter(chunk.values())))
        if not self.buf:
            self.capacity = max(self.capacity, k)
            self.buf = {name: np.empty((self.capacity, *a.shape[1:]), a.dtype) for name, a in chunk.items()}
        if self.n + k > self.capacity:
            self.capacity = max(2 * self.capacity, self.n + k)
            for name, a in self.buf.items():
                grown = np.empty((self.capacity, *a.shape[1:]), a.dtype)
                grown[:self.n] = a[:self.n]
                self.buf[name] = grown
        for name, a in chunk.items():
            self.buf[name][self.n:self.n + k] = a
        self.n += k

    def result(self) -> dict[str, np.ndarray]:
        return {name: a if self.n == len(a) else a[:self.n].copy() for name, a in self.buf.items()}


def _cat(chunks: list[dict[str, np.ndarray] | None]) -> dict[str, np.ndarray]:
    """The parts' arrays concatenated by name (empty parts skipped)."""
    chunks = [c for c in chunks if c]
    if not chunks:
        return {}
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def map_batches(fn: Callable[[torch.Tensor, torch.Tensor | None], dict[str, np.ndarray]], data, batch_size: int,
                what: str, fingerprint: str = "", part_cache: tuple[Path, str] | None = None,
                progress: Callable[[int], object] | None = None) -> dict[str, np.ndarray]:
    """``fn(x, y)`` on every batch of ``data``, concatenated in order: ``{name: array with one row per sample}``.

    Without a process group of several ranks this is a plain loop. Under one, the batches are split
    between the ranks (module docstring) and every rank returns the full result. ``part_cache`` =
    (path stem, key): each finished part is cached as ``<stem>.part-B0-B1.npz`` under ``key``; the
    caller deletes them (:func:`drop_parts`) once the full result is saved. ``fingerprint``: the
    model's, compared between ranks. ``progress(k)`` is called after each batch of k samples.
    """
    from .cache import load_verified, save_verified

    rank, world = rank_world()
    from .batching import data_length, is_sliceable

    if world == 1:
        from .batching import iter_batches

        rows = _Rows(data_length(data))
        for x, y in iter_batches(data, batch_size):
            rows.add(fn(x, y))
            if progress:
                progress(int(x.shape[0]))
        return rows.result()

    n = data_length(data)
    n_batches = _n_batches(data, batch_size)
    check_same({"uvood": _version(), "torch": torch.__version__, "model": fingerprint, "samples": n,
                "batches": n_batches, "batch_size": batch_size}, f"the inputs of {what}")
    if n is not None and n < world:
        raise UvoodError(f"{n} samples for {world} ranks: each rank needs at least one. Start fewer ranks "
                         f"(torchrun --nproc_per_node={max(n, 1)}) or run without torchrun.")
    parts = part_ranges(n_batches, world)

    def part_path(b0: int, b1: int) -> Path:
        stem, _ = part_cache
        return Path(f"{stem}.part-{b0}-{b1}.npz")

    def part_key(b0: int, b1: int) -> str:
        return f"{part_cache[1]}|batches {b0}-{b1} of {n_batches}"

    done: dict[tuple[int, int], dict] = {}
    if part_cache is not None:
        todo = None
        if rank == 0:  # rank 0 decides what is missing; the others follow its list
            for p in parts:
                arrays = load_verified(part_path(*p), part_key(*p), "Part cache")
                if arrays is not None:
                    done[p] = arrays
            todo = [p for p in parts if p not in done]
        todo = broadcast(todo, f"the list of missing parts of {what}")
    else:
        todo = parts
    mine = split(todo, world, rank)
    result: object
    error: Exception | None = None
    try:
        computed = {}
        for b0, b1 in mine:
            rows = _Rows(min(b1 * batch_size, n) - b0 * batch_size if is_sliceable(data) else None)
            for _, (x, y) in _batches_in(data, batch_size, [(b0, b1)]):
                with local():
                    rows.add(fn(x, y))
                if progress:
                    progress(int(x.shape[0]))
            computed[(b0, b1)] = rows.result()
            if part_cache is not None:
                save_verified(part_path(b0, b1), part_key(b0, b1), computed[(b0, b1)], any_rank=True)
        result = ("ok", {**done, **computed})  # rank 0 also hands on the parts it read from the cache
    except Exception as e:  # noqa: BLE001 - reported to every rank below, then raised everywhere
        result = ("error", f"{type(e).__name__}: {e}")
        error = e
    for computed in _gather_or_raise(result, error, what):
        done.update(computed)
    return _cat([done[p] for p in parts])


def _gather_or_raise(result: tuple[str, object], error: Exception | None, what: str) -> list:
    """Every rank's ``("ok", value)`` or ``("error", message)``: the values in rank order, or, when a rank failed,
    an error on every rank (this rank's own UvoodError as it was, else one naming the rank that failed)."""
    gathered = all_gather(result, what)
    failed = [(r, msg) for r, (status, msg) in enumerate(gathered) if status == "error"]
    if failed:
        if result[0] == "error" and isinstance(error, UvoodError):
            raise error
        r, msg = failed[0]
        raise UvoodError(f"rank {r} of {len(gathered)} failed during {what}: {msg}")
    return [value for _, value in gathered]


def map_shards(fn: Callable[[int], object], n: int, what: str) -> list:
    """``[fn(i) for i in range(n)]``; under a process group of several ranks each rank computes a contiguous share
    of the ``i`` (:func:`split`; ``fn`` runs inside :func:`local`, so uvood calls in it are not split again) and
    every rank gets the whole list, in order (one ``all_gather_object``; ``fn``'s values must be picklable).
    A rank that raises makes every rank raise. Used by the benchmark runner for its chunks of images
    (:func:`uvood.bench.runner._chunked`): the same chunks as one process, so the same values."""
    rank, world = rank_world()
    if world == 1:
        return [fn(i) for i in range(n)]
    error: Exception | None = None
    try:
        with local():
            result: tuple[str, object] = ("ok", [fn(i) for i in split(list(range(n)), world, rank)])
    except Exception as e:  # noqa: BLE001 - reported to every rank, then raised everywhere
        result, error = ("error", f"{type(e).__name__}: {e}"), e
    return [v for values in _gather_or_raise(result, error, what) for v in values]


def drop_parts(stem: str | Path) -> None:
    """Delete the part files of ``stem`` (rank 0, once the full result is saved)."""
    stem = Path(stem)
    for p in stem.parent.glob(stem.name + ".part-*.npz"):
        p.unlink(missing_ok=True)
