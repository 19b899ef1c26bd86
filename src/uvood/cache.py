"""Verified, atomic on-disk caches of numpy arrays.

A cache file is an ``.npz`` holding the arrays, the ``key`` it was made for (a hash of
everything that determines its content) and a sha256 ``digest`` of the arrays. It is written
to a temp file in the same folder and renamed, so a crash never leaves a half file. On load,
a file that cannot be read, whose digest does not match, or whose key is another one (a stale
cache, e.g. from another model or an older version of the code: keys carry code versions) is
reported with a warning, deleted and treated as absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    d = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        d.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode())
        d.update(a.tobytes())
    return d.hexdigest()


def default_cache_dir() -> Path:
    """uvood's cache folder: ``$UVOOD_CACHE``, else ``~/.cache/uvood``."""
    return Path(os.environ.get("UVOOD_CACHE", Path.home() / ".cache" / "uvood"))


def atomic_write(path, write: Callable[[BinaryIO], object], any_rank: bool = False) -> None:
    """Write a file atomically: ``write(f)`` fills a temp file (unique name, same folder), which
    then replaces ``path``; on any failure the temp file is removed and ``path`` is untouched.
    Every file uvood writes (caches, checkpoints, detectors, memos) goes through here.

    Under ``torchrun`` only rank 0 writes (:func:`uvood.distributed.is_writer`): the other ranks hold
    the same values and skip the write, unless ``any_rank`` (the part files of a sharded run)."""
    from .distributed import is_writer

    if not any_rank and not is_writer():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_npz(path: Path, arrays: dict[str, np.ndarray], any_rank: bool = False) -> None:
    """Write ``arrays`` to ``path`` as ``.npz``, atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: np.savez(f, **arrays), any_rank)


def save_verified(path: Path, key: str, arrays: dict[str, np.ndarray], any_rank: bool = False) -> None:
    """Atomically save ``arrays`` with their ``key`` and digest (rank 0 only unless ``any_rank``)."""
    atomic_save_npz(path, {**arrays, "key": np.array(key), "digest": np.array(arrays_digest(arrays))}, any_rank)


def load_verified(path: Path, key: str, what: str = "cache") -> dict[str, np.ndarray] | None:
    """The arrays of a verified cache file made for ``key``, or None (warned, file deleted)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        stored_key, digest = str(arrays.pop("key")), str(arrays.pop("digest"))
        if arrays_digest(arrays) != digest:
            raise ValueError("its checksum does not match its content")
        if stored_key != key:
            raise ValueError("it was made for another model, data, transform or code version (stale cache)")
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        warnings.warn(f"{what} {path} is corrupt or stale ({e}); recomputing it.", stacklevel=3)
        path.unlink(missing_ok=True)
        return None
    return arrays


def peek(path: Path, key: str, name: str) -> str | None:
    """The small string member ``name`` of the cache file ``path`` made for ``key``, read without loading or
    checking its other arrays (the zip member's CRC is still checked); None when the file, the member or the key
    is missing or unreadable. Only for a value a run may trust before it needs the rest of the file, because a
    full :func:`load_verified` re-checks the whole file, that member included (its digest covers it), before
    anything else of it is used."""
    try:
        with np.load(Path(path), allow_pickle=False) as f:
            if name not in f.files or str(f["key"]) != key:
                return None
            return str(f[name])
    except Exception:  # noqa: BLE001 - unreadable: the caller falls back to a full load
        return None

#: a lock older than this is taken over even if its owner cannot be checked (another host); deep items take minutes
LOCK_STALE_S = 6 * 3600.0


def _lock_is_stale(lock: Path, stale_s: float) -> bool:
    """Its owner process is gone (same host), or it is older than ``stale_s`` seconds."""
    try:
        owner = json.loads(lock.read_text())
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return False  # being written or just released: look again
    if age > stale_s:
        return True
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except (OSError, KeyError, ValueError, TypeError):
            return False
    return False


@contextlib.contextmanager
def claim(path, stale_s: float = LOCK_STALE_S, poll_s: float = 0.5, log: Callable[[str], object] | None = None
          ) -> Iterator[None]:
    """Hold the lock ``path.lock`` while the item ``path`` is computed and written.

    The lock file is created with ``O_CREAT | O_EXCL`` (one owner at a time) and holds the owner's
    pid and host. A second run that wants the same item waits until the lock is released and then
    reads the item from the cache instead of computing it again. A lock whose owner process is gone
    (same host; e.g. a killed run) or older than ``stale_s`` is taken over. The lock is removed on
    any exit, Ctrl-C included. (Two runs taking over the same stale lock at the same instant may both
    compute the item; atomic writes keep the file whole either way.)
    """
    from .distributed import is_writer

    if not is_writer():  # under torchrun rank 0 holds the lock for all ranks (they compute the item together)
        yield
        return
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_is_stale(lock, stale_s):
                lock.unlink(missing_ok=True)
                continue
            if log is not None and not told:
                log(f"waiting for another uvood run, which is computing {Path(path).name} ({lock})")
                told = True
            time.sleep(poll_s)
            continue
        break
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}))
        yield
    finally:
        lock.unlink(missing_ok=True)
