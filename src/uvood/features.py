"""Feature extraction with an on-disk cache: (model, data, transform) -> (h, logits, y).

The cache key is the sha256 of the model's weights (and head), the data's identity and the
transform's name. Cache files are written atomically (temp file + rename) and carry a sha256
of their arrays; a file that fails to load or verify is reported, deleted and recomputed,
never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .batching import data_length
from .cache import load_verified, save_verified
from .distributed import all_gather, drop_parts, is_writer
from .errors import UvoodError
from .model import eval_mode
from .precision import forward_features as forward_in
from .progress import bar as progress_bar
from .validation import check_finite, check_nonempty

FORMAT_VERSION = 1


@dataclass
class Features:
    """Penultimate features ``h`` (N x D), ``logits`` (N x C) and labels ``y`` (N, or None)."""

    h: torch.Tensor
    logits: torch.Tensor
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def subset(self, idx) -> Features:
        return Features(self.h[idx], self.logits[idx], None if self.y is None else self.y[idx])


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's class name, its ``fingerprint_tag`` (if any: what changes its outputs beyond
    the weights, e.g. EfficientNet-Lite's channels-last layout, whose float32 rounding differs) and every
    parameter and buffer (name, shape, bytes)."""
    d = hashlib.sha256(type(model).__name__.encode())
    if getattr(model, "fingerprint_tag", ""):
        d.update(b"|tag:" + str(model.fingerprint_tag).encode())
    for name, t in model.state_dict().items():
        d.update(name.encode())
        d.update(str(tuple(t.shape)).encode())
        d.update(str(t.dtype).encode())
        d.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16
                 else t.detach().float().cpu().numpy().tobytes())
    return d.hexdigest()


def tensor_fingerprint(x: torch.Tensor | np.ndarray) -> str:
    a = x.detach().cpu().contiguous().numpy() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x)
    d = hashlib.sha256(f"{a.dtype}{a.shape}".encode())
    d.update(a.tobytes())
    return d.hexdigest()


def _compute(model, data, batch_size, head, progress, desc, dtype=None, part_cache=None,
             precision: str = "float32") -> Features:
    """Features of every batch of ``data``; under torchrun each rank computes its share
    (:func:`uvood.distributed.map_batches`) and every rank gets the whole, in order."""
    from .distributed import dist, map_batches
    from .model import input_range, model_channels, model_dtype, with_dtype
    from .validation import model_input, warn_range

    total = data_length(data)
    model, head = with_dtype(model, head, dtype)
    run_dtype, channels, expected = model_dtype(model), model_channels(model), input_range(model)
    keep = torch.float64 if run_dtype == torch.float64 else torch.float32
    warned: dict = {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def one_batch(x, y):
        if x.ndim > 0 and x.shape[0] == 0:
            return None
        x = model_input(x, run_dtype, channels).to(device)
        warn_range(x, expected, warned)
        h, z = forward_in(model, x, head, precision)  # bfloat16 autocast when asked (uvood.precision)
        n = x.shape[0]
        return {"h": h.to(keep).cpu().numpy(), "logits": z.to(keep).cpu().numpy(),
                "y": np.zeros(n, np.int64) if y is None else y.cpu().long().numpy(),
                "has_y": np.full(n, y is not None)}

    with torch.no_grad(), eval_mode(model):
        bar = progress_bar(total, desc, progress)
        try:
            out = map_batches(one_batch, data, batch_size, f"features ({desc})",
                              fingerprint=model_fingerprint(model) if dist() else "", part_cache=part_cache,
                              progress=bar.update)
        finally:
            bar.close()
    if not out:
        raise UvoodError("The data is empty: no samples to extract features from. Pass at least one sample.")
    logits = torch.from_numpy(out["logits"])
    check_nonempty(logits, "data")
    check_finite(logits, "logits", "The model produced non-finite logits on these inputs: check the inputs' "
                 "range (uvood zoo models take pixels in [0, 1]) and the model's weights.")
    has_y = bool(out["has_y"].all())
    return Features(torch.from_numpy(out["h"]), logits, torch.from_numpy(out["y"]) if has_y else None)


def cache_key(model, data_id: str, transform: str = "", head=None, dtype=None, precision: str = "float32") -> str:
    meta = {"v": FORMAT_VERSION, "model": model_fingerprint(model), "data": data_id,
            "transform": transform, "head": head if isinstance(head, str) or head is None else repr(head)}
    if dtype is not None:  # only when asked for, so that the keys of existing caches stay valid
        meta["dtype"] = str(dtype)
    if precision != "float32":  # bfloat16 features never mix with float32 ones
        meta["precision"] = precision
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def load_cached(path: Path, key: str) -> Features | None:
    """Load a verified cache file, or return None (warning and deleting it) if it is bad or stale."""
    arrays = load_verified(path, key, "Feature cache")
    if arrays is None:
        return None
    y = arrays.get("y")
    return Features(torch.from_numpy(arrays["h"]), torch.from_numpy(arrays["logits"]),
                    torch.from_numpy(y) if y is not None and y.size else None)


def extract(model: torch.nn.Module, data, batch_size: int = 256, head=None, cache_dir: str | os.PathLike | None = None,
            data_id: str | None = None, transform: str = "", progress: bool = True, desc: str = "features",
            cache_name: str | None = None, dtype=None, precision: str | None = None) -> Features:
    """Run ``model`` once over ``data`` and return its :class:`Features` ``(h, logits, y)``.

    ``data`` is a tensor N x C x H x W (float, the model's input format), an ``(x, y)`` pair or
    a DataLoader. With ``cache_dir``, results are cached under a key made of the model's weights,
    ``data_id`` (default: a hash of the tensor; DataLoaders need an explicit ``data_id``) and
    ``transform`` (a name for the preprocessing that produced ``data``). ``cache_name`` names the
    file (default: the key); a file of that name made for another key is reported as stale.
    ``data`` may also be a function returning the data, called only on a cache miss (with an
    explicit ``data_id``): a warm lookup then reads no image.

    Inputs follow :func:`uvood.validation.model_input` (uint8 images are scaled to [0, 1], image
    layouts follow :data:`uvood.validation.LAYOUT_RULE`, float64 arrays are converted to the
    model's dtype). ``dtype="float64"`` runs a float64 copy of the model (features kept in
    float64, cached under their own key); see :func:`uvood.score_model` for why.
    ``precision="bfloat16"`` runs the forward under bfloat16 autocast (:mod:`uvood.precision`; features
    kept in float32, cached under their own key); None: the default (``--precision``, float32).
    """
    from .model import parse_dtype
    from .precision import check

    dtype = parse_dtype(dtype)
    precision = check(precision, dtype, model)
    lazy = callable(data)
    if lazy and (data_id is None or cache_dir is None):
        raise UvoodError("data given as a function needs cache_dir and data_id (it is only called on a cache "
                         "miss); pass the tensor or DataLoader itself otherwise.")
    if cache_dir is None:
        return _compute(model, data, batch_size, head, progress, desc, dtype, precision=precision)
    if data_id is None:
        if isinstance(data, (torch.Tensor, np.ndarray)):
            data_id = "tensor:" + tensor_fingerprint(data)
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            data_id = "tensor:" + tensor_fingerprint(data[0]) + tensor_fingerprint(data[1])
        else:
            raise UvoodError("To cache features of a DataLoader, pass data_id='a name for this data' "
                             "(tensors are hashed automatically).")
    key = cache_key(model, data_id, transform, head, dtype, precision)
    path = Path(cache_dir) / f"features-{cache_name or key[:32]}.npz"
    cached = load_cached(path, key)
    if all(all_gather(cached is not None, "the feature cache lookup")):  # every rank found it (or one process)
        return cached
    if lazy:
        data = data()
    stem = path.with_suffix("")
    feats = _compute(model, data, batch_size, head, progress, desc, dtype, part_cache=(stem, key),
                     precision=precision)
    arrays = {"h": feats.h.numpy(), "logits": feats.logits.numpy(),
              "y": feats.y.numpy() if feats.y is not None else np.zeros(0, np.int64)}
    save_verified(path, key, arrays)  # rank 0 only under torchrun
    if is_writer():
        drop_parts(stem)
    return feats
