"""A detector an engineer wraps around their own model: fit on ID data, score, flag, save, load.

    det = uvood.Detector(model, score="norm(0.3)*energy").fit(id_loader, tpr=0.95)
    det.predict(x)   # BoolTensor, True = OOD
    det.save("det.pt"); det = uvood.Detector.load("det.pt", model)

The threshold keeps ``tpr`` of the ID fitting data (:func:`uvood.metrics.threshold_at_tpr`,
the rule the FPR@TPR metric uses): x is flagged OOD when S(x) < threshold.

The file format is ``torch.save`` of ``{"meta": JSON string, "state": {name: tensor}}``, loaded
with ``weights_only=True`` (no arbitrary pickle). :meth:`Detector.load` checks it against
:data:`META_FIELDS` and :data:`STATE_SHAPES` and refuses a file that does not fit: unknown
fields or tensors, wrong types, out-of-range values, a threshold outside the ID scores it was
fitted on, a format version other than this uvood's, a checksum that no longer matches the
content (the spec, threshold or state was edited), a score whose code version changed since the
fit, a model with other weights (``strict=False``: loaded with a warning) or another class count.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings

import numpy as np
import torch

from . import metrics
from .api import score_features, score_model
from .batching import data_length, iter_batches
from .cache import atomic_write
from .errors import UvoodError
from .features import model_fingerprint, tensor_fingerprint
from .model import (
    eval_mode,
    head_name,
    input_range,
    model_channels,
    model_dtype,
    parse_dtype,
    resolve_head,
    with_dtype,
)
from .precision import check as check_precision
from .precision import forward_features as forward_in
from .progress import bar
from .scores.registry import get_score
from .validation import check_images, model_input, warn_range

FORMAT = "uvood-detector"
#: 2: checksum and id_score_range added; a version-1 file is refused (fit the detector again)
VERSION = 2


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: field -> (check, what it must be); every field of a saved file, none other
META_FIELDS = {
    "format": (lambda v: v == FORMAT, f"the string {FORMAT!r}"),
    "version": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "spec": (lambda v: isinstance(v, str) and v.strip() != "", "a score spec string"),
    "threshold": (lambda v: _is_real(v) and math.isfinite(v), "a finite number"),
    "tpr": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "input_shape": (lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(d) and d >= 1 for d in v),
                    "a list [C, H, W] of 3 positive integers"),
    "num_classes": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "head": (lambda v: v is None or isinstance(v, str), "a module name or null"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "model_sha256": (lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest"),
    "id_score_range": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_real(t) and math.isfinite(t)
                                                                              for t in v) and v[0] <= v[1],
                       "a list [min, max] of two finite numbers"),
    "score_version": (lambda v: isinstance(v, str), "a string of registry versions, e.g. 'norm:1*energy:1'"),
    "checksum": (lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest"),
    "dtype": (lambda v: v is None or v in ("float32", "float64"), "null (the model's own), 'float32' or 'float64'"),
    "precision": (lambda v: v == "bfloat16", "'bfloat16' (absent for float32)"),
}

#: fields a file may lack, with the value their absence means
OPTIONAL_FIELDS = {"precision": "float32"}

#: BatchGrad's fitted-state tensors -> (their shape given C classes, the input shape and D features,
#: whether they hold floats). Other fitted scores (uvood.scores.fitted, shaping) check their own tensors in
#: ``load_state``; every file's state must be exactly the tensors its score keeps once loaded.
STATE_SHAPES = {
    "anchor_x": (lambda c, shape, d: (c, *shape), True),
    "anchor_y": (lambda c, shape, d: (c,), False),
    "anchor_grad": (lambda c, shape, d: (c, d), True),  # (c, d + 1) with bias=true: see Detector.load
}


def _checksum(meta: dict, state: dict[str, torch.Tensor]) -> str:
    """sha256 of the meta fields (checksum excluded, canonical JSON) and every state tensor."""
    d = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for key in sorted(state):
        d.update(key.encode())
        d.update(tensor_fingerprint(state[key]).encode())
    return d.hexdigest()


def _score_version(score) -> str:
    """The registry versions of the score's terms (``version_tag``, e.g. ``"norm:1*energy:1"``)."""
    return getattr(score, "version_tag", "")


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which float type the model computes (its first floating parameter or buffer)."""
    from .devices import model_float

    return model_float(model)


def _rows(data, idx: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The inputs ``data[idx]`` (in the order of ``idx``): indexed directly in a tensor, else read from the batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, np.ndarray)):
        data = data[0]
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(data[idx.numpy()] if isinstance(data, np.ndarray) else data[idx])
    found: dict[int, torch.Tensor] = {}
    start, wanted = 0, set(idx.tolist())
    for x, _ in iter_batches(data, batch_size):
        for i in wanted & set(range(start, start + x.shape[0])):
            found[i] = x[i - start]
        start += x.shape[0]
        if len(found) == len(wanted):
            break
    return torch.stack([found[int(i)] for i in idx])


def _read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The file's meta and state, checked against :data:`META_FIELDS` (types and ranges)."""
    def bad(what: str) -> UvoodError:
        return UvoodError(f"{path} is not a valid uvood detector file: {what}. Fit the detector again and save it.")

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UvoodError(f"No detector file at {path}: check the path (Detector.save writes it).") from None
    except Exception as e:  # truncated, not a torch file, or holding objects other than tensors
        raise bad(f"it cannot be read as a tensors-only torch file ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("meta"), str):
        raise bad("it holds no 'meta' JSON string")
    if set(payload) - {"meta", "state"}:
        raise bad(f"unknown entries {sorted(set(payload) - {'meta', 'state'})}")
    try:
        meta = json.loads(payload["meta"])
    except json.JSONDecodeError as e:
        raise bad(f"its meta is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise bad(f"its meta is a JSON {type(meta).__name__}, not an object of fields")
    if meta.get("format") != FORMAT:
        raise bad(f"format {meta.get('format')!r} instead of {FORMAT!r}")
    version = meta.get("version")
    if not META_FIELDS["version"][0](version):
        raise bad(f"field 'version' must be {META_FIELDS['version'][1]}, got {str(version)[:100]!r}")
    if version != VERSION:
        raise UvoodError(f"{path} was written by {'a newer' if version > VERSION else 'an older'} uvood (detector "
                         f"format version {version}; this uvood reads version {VERSION}): "
                         + ("upgrade uvood, or " if version > VERSION else "") + "fit the detector again and save it.")
    fields = set(META_FIELDS)
    if set(meta) - fields:
        raise bad(f"unknown field(s) {sorted(set(meta) - fields)}")
    if fields - set(meta) - set(OPTIONAL_FIELDS):
        raise bad(f"missing field(s) {sorted(fields - set(meta) - set(OPTIONAL_FIELDS))}")
    for key in META_FIELDS:
        if key in meta and not META_FIELDS[key][0](meta[key]):
            raise bad(f"field {key!r} must be {META_FIELDS[key][1]}, got {str(meta[key])[:100]!r}")
    state = payload.get("state", {})
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise bad("its 'state' is not a dict of named tensors")
    for key, t in state.items():
        leaf = key.rsplit(".", 1)[-1]
        if t.is_complex():
            raise bad(f"state tensor {key!r} has dtype {t.dtype}, expected a real tensor")
        if leaf in STATE_SHAPES and t.is_floating_point() != STATE_SHAPES[leaf][1]:
            raise bad(f"state tensor {key!r} has dtype {t.dtype}, expected "
                      f"{'float' if STATE_SHAPES[leaf][1] else 'int'}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise bad(f"state tensor {key!r} holds NaN or infinite values")
    lo, hi = meta["id_score_range"]
    if not lo <= meta["threshold"] <= hi:
        raise bad(f"field 'threshold' = {meta['threshold']!r} lies outside the range [{lo!r}, {hi!r}] of the ID "
                  "scores it was fitted on")
    if meta["checksum"] != _checksum(meta, state):
        raise bad("its checksum does not match its content (the spec, threshold, settings or fitted state were "
                  "edited after it was saved)")
    return meta, state


class Detector:
    """OOD detector around ``model`` with the score ``score`` (a registry spec string)."""

    def __init__(self, model: torch.nn.Module, score: str = "norm(0.3)*energy", head=None, batch_size: int = 128,
                 dtype=None, precision: str | None = None):
        if not _is_int(batch_size) or batch_size < 1:
            raise UvoodError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        self.model = model
        self.dtype = parse_dtype(dtype)  # None: the model's own; "float64": batch-independent (uvood.score_model)
        self._twin = None  # (model, head) converted to dtype, made on first use
        self.precision = check_precision(precision, self.dtype, model)  # bfloat16: autocast forward (uvood.precision)
        self.score_fn = get_score(score)
        self.spec = self.score_fn.spec
        self.head = resolve_head(model, head)
        self.batch_size = batch_size
        self.threshold: float | None = None
        self.tpr: float | None = None
        self.input_shape: tuple[int, ...] | None = None
        self.num_classes: int | None = None
        self.id_score_range: tuple[float, float] | None = None

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, logits) of a batch, computed on the model's device, in its float type or in ``dtype``."""
        if self.dtype is not None and self._twin is None:
            self._twin = with_dtype(self.model, self.head, self.dtype)
        model, head = self._twin or (self.model, self.head)
        device, dtype = _device_dtype(model)
        with torch.no_grad(), eval_mode(model):
            return forward_in(model, x.to(device=device, dtype=dtype), head, self.precision)

    # ------------------------------------------------------------------ fitting
    def fit(self, id_data, tpr: float = 0.95, seed: int = 0, progress: bool = True) -> Detector:
        """Set the threshold that keeps ``tpr`` of ``id_data`` (tensor, (x, y) pair or DataLoader):
        t = :func:`uvood.metrics.threshold_at_tpr` of the ID scores.

        Scores that need ID data are fitted first, on the same data (with labels). The data is
        streamed batch by batch and the model sees it once: scores from features are fitted on and
        computed from the features of that pass (the fitted state and the N scores are all that grow
        with the data); a score that needs the model scores the batches in that pass. BatchGrad's
        anchors (one sample per class) are read from the data by index, without a forward pass.
        Under ``torchrun`` every rank computes its share of the batches (:mod:`uvood.distributed`).
        """
        from .distributed import broadcast_state, map_batches
        from .scores.fitted import FittedScore, factors, head_weights

        if isinstance(tpr, (torch.Tensor, np.ndarray, list, tuple)):  # fit(x, y), the scikit-learn habit
            raise UvoodError("Detector.fit takes the ID data as ONE argument: fit((x, y)) or a DataLoader of (x, y) "
                             "batches for labelled data, fit(x) without labels. Its second argument is tpr, the share "
                             "of ID data the threshold keeps (e.g. 0.95).")
        tpr = metrics.check_tpr(tpr)
        first = next(iter(iter_batches(id_data, self.batch_size)), None)
        if first is None or first[0].ndim == 0 or first[0].shape[0] == 0:
            raise UvoodError("id_data is empty: pass at least one in-distribution sample to fit the detector.")
        x0 = check_images(model_input(first[0], model_dtype(self.model), model_channels(self.model), "id_data"),
                          name="id_data")
        self.input_shape = tuple(x0.shape[1:])
        _, logits = self._forward(x0[:1])
        self.num_classes = int(logits.shape[1])
        device, dtype = _device_dtype(self.model)
        fitted = [f for f in factors(self.score_fn) if f.needs_fit]
        model_fits = [f for f in fitted if not isinstance(f, FittedScore)]  # BatchGrad: anchors drawn from the data
        y_all = self._labels(id_data) if model_fits else None
        for f in model_fits:  # the anchors are the only images kept: one per class
            y = self._checked_labels(y_all) if y_all is not None else None
            if y is None:
                raise UvoodError("BatchGrad needs labelled ID training data: fit on (x, y) pairs.")
            idx = f._anchor_indices(y, self.num_classes, seed)
            xa = model_input(_rows(id_data, idx, self.batch_size), model_dtype(self.model),
                             model_channels(self.model), "id_data")
            f.fit(self.model, xa.to(device=device, dtype=dtype), y[idx], head=self.head, seed=seed)
        keep_features = any(isinstance(f, FittedScore) for f in fitted)

        def one_batch(x, y):
            x = self._fit_input(x, y)
            if keep_features:  # fitted statistics first: the scores need them, so they come after the pass
                h, z = self._forward(x)
                return {"h": h.float().cpu().numpy() if h.dtype != torch.float64 else h.cpu().numpy(),
                        "logits": z.float().cpu().numpy() if z.dtype != torch.float64 else z.cpu().numpy(),
                        "y": (torch.full((x.shape[0],), -1) if y is None else y.long()).cpu().numpy()}
            return {"s": self._score_batch(x).cpu().numpy()}

        pbar = bar(data_length(id_data), f"fit {self.spec}", progress)
        try:
            out = map_batches(one_batch, id_data, self.batch_size, f"the fit of {self.spec}",
                              fingerprint=self._fingerprint(), progress=pbar.update)
        finally:
            pbar.close()
        if keep_features:
            h, z = torch.from_numpy(out["h"]), torch.from_numpy(out["logits"])
            y = torch.from_numpy(out["y"])
            y = None if bool((y < 0).any()) else y
            w, b = head_weights(self.model, x0[:1].to(device=device, dtype=dtype), self.head) \
                if any(getattr(f, "needs_head", False) for f in fitted) else (None, None)
            for f in fitted:
                if isinstance(f, FittedScore):
                    f.fit_features(h, z, y, weight=w, bias=b)
            scores = score_features(self.score_fn, h, z)
        else:
            scores = torch.from_numpy(out["s"])
        broadcast_state(self.score_fn)  # the same statistics on every rank, whatever drew them
        self.threshold = metrics.threshold_at_tpr(scores, tpr)
        self.tpr = tpr
        self.id_score_range = (float(scores.min()), float(scores.max()))
        return self

    def _labels(self, data) -> torch.Tensor | None:
        """Every label of ``data`` (None when a batch has none), read without running the model."""
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, np.ndarray)):
            return torch.as_tensor(data[1]).reshape(-1)
        ys = [y for _, y in iter_batches(data, self.batch_size)]
        return torch.cat([y.reshape(-1) for y in ys]) if ys and all(y is not None for y in ys) else None

    def _checked_labels(self, y: torch.Tensor) -> torch.Tensor:
        y = y.long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise UvoodError(f"id_data labels range over [{int(y.min())}, {int(y.max())}] but the model has "
                             f"{self.num_classes} classes: the data and the model do not match.")
        return y

    def _fit_input(self, x, y) -> torch.Tensor:
        """A batch of ID data, checked: images of the fitted shape, labels that match the model."""
        x = check_images(model_input(x, model_dtype(self.model), model_channels(self.model), "id_data"),
                         name="id_data")
        if tuple(x.shape[1:]) != self.input_shape:
            raise UvoodError(f"id_data batches differ in per-sample shape: {tuple(x.shape[1:])} and "
                             f"{self.input_shape}. Bring every image to one size (uvood.data.transforms).")
        if y is not None:
            if y.shape[0] != x.shape[0]:
                raise UvoodError(f"id_data has a batch of {x.shape[0]} inputs but {y.shape[0]} labels.")
            self._checked_labels(y)
        return x

    # ------------------------------------------------------------------ scoring
    def _check_input(self, x) -> torch.Tensor:
        x = model_input(x, model_dtype(self.model), model_channels(self.model), "x")
        warn_range(x, input_range(self.model), {}, "x")
        x = check_images(x, expected_channels=self.input_shape[0] if self.input_shape else None, name="x")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise UvoodError(f"x has per-sample shape {tuple(x.shape[1:])} but the detector was fitted on "
                             f"{self.input_shape}. Resize the inputs (uvood.data.transforms.to_model_format).")
        return x

    def _fingerprint(self) -> str:
        """The model's fingerprint, compared between ranks under torchrun (not computed otherwise)."""
        from .distributed import dist

        return model_fingerprint(self.model) if dist() else ""

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        """S(x) of one checked batch, float64 (N,)."""
        if self.score_fn.needs_model:
            return score_model(self.score_fn, self.model, x, self.batch_size, self.head, progress=False,
                               dtype=self.dtype, precision=self.precision)
        h, z = self._forward(x)
        return score_features(self.score_fn, h, z).cpu()

    def score(self, data, progress: bool = True) -> torch.Tensor:
        """S(x) for images N x C x H x W, an ``(x, y)`` pair or a DataLoader; higher = more
        in-distribution. Returns float64 (N,). ``progress``: a bar counting images on a terminal.

        The data is streamed: each batch is scored and dropped, so memory does not grow with N
        beyond the N scores. Under ``torchrun`` each rank scores its share (:mod:`uvood.distributed`)."""
        from .distributed import map_batches

        pbar = bar(data_length(data), f"score {self.spec}", progress)
        try:
            out = map_batches(lambda x, _y: {"s": self._score_batch(self._check_input(x)).numpy()}, data,
                              self.batch_size, f"the score {self.spec}", fingerprint=self._fingerprint(),
                              progress=pbar.update)
        finally:
            pbar.close()
        if not out:
            raise UvoodError("The data is empty: pass at least one image to score.")
        return torch.from_numpy(out["s"])

    def predict(self, data, progress: bool = True) -> torch.Tensor:
        """BoolTensor (N,): True where x is flagged OOD (S(x) < threshold); ``data`` as in :meth:`score`."""
        if self.threshold is None:
            raise UvoodError("The detector has no threshold yet: call det.fit(id_data) first.")
        return self.score(data, progress=progress) < self.threshold

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Save spec, threshold, fitted score state, a fingerprint of the model and a checksum (no pickle)."""
        if self.threshold is None:
            raise UvoodError("Fit the detector before saving it (det.fit(id_data)).")
        meta = {"format": FORMAT, "version": VERSION, "spec": self.spec, "threshold": self.threshold,
                "tpr": self.tpr, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "head": head_name(self.model, self.head) if self.head is not None else None,
                "batch_size": self.batch_size, "model_sha256": model_fingerprint(self.model),
                "id_score_range": list(self.id_score_range), "score_version": _score_version(self.score_fn),
                "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch.")}
        if self.precision != "float32":  # written only when not float32: float32 files keep their format
            meta["precision"] = self.precision
        state = {k: v.detach().cpu() for k, v in self.score_fn.state().items()}
        meta["checksum"] = _checksum(meta, state)
        atomic_write(path, lambda f: torch.save({"meta": json.dumps(meta), "state": state}, f))

    @classmethod
    def load(cls, path, model: torch.nn.Module, strict: bool = True) -> Detector:
        """Load a saved detector onto ``model``, checking the file (see the module docstring).

        A model whose weights differ from those the detector was fitted with is refused when
        ``strict``, loaded with a ``UserWarning`` otherwise.
        """
        meta, state = _read(path)
        det = cls(model, score=meta["spec"], head=meta["head"], batch_size=meta["batch_size"], dtype=meta["dtype"],
                  precision=meta.get("precision", "float32"))
        if det.spec != meta["spec"]:
            raise UvoodError(f"{path} is not a valid uvood detector file: its spec {meta['spec']!r} is not in the "
                             f"canonical form uvood writes ({det.spec!r}). Fit the detector again and save it.")
        if _score_version(det.score_fn) != meta["score_version"]:
            raise UvoodError(f"The score {det.spec!r} was fitted with another version of its code "
                             f"({meta['score_version']!r}, now {_score_version(det.score_fn)!r}): its values, and so "
                             f"the threshold in {path}, may have changed. Fit the detector again and save it.")
        if model_fingerprint(model) != meta["model_sha256"]:
            msg = (f"The model's weights differ from those the detector at {path} was fitted with; "
                   "its threshold may be meaningless.")
            if strict:
                raise UvoodError(msg + " Refit it, or pass strict=False to load anyway.")
            warnings.warn(msg + " Loaded anyway (strict=False); refit it to be sure.", UserWarning, stacklevel=2)
        det.threshold, det.tpr = float(meta["threshold"]), float(meta["tpr"])
        det.input_shape, det.num_classes = tuple(meta["input_shape"]), meta["num_classes"]
        det.id_score_range = tuple(meta["id_score_range"])
        device, dtype = _device_dtype(model)
        try:
            h, logits = det._forward(torch.zeros((1, *det.input_shape), device=device, dtype=dtype))
        except UvoodError:
            raise
        except Exception as e:
            raise UvoodError(f"The model does not take the detector's input shape {det.input_shape} ({e}): load it "
                             "onto the model it was fitted with.") from None
        if logits.shape[1] != det.num_classes:
            raise UvoodError(f"The detector was fitted for {det.num_classes} classes but the model has "
                             f"{logits.shape[1]}: load it onto the model it was fitted with.")
        # shallow BatchGrad with bias=true differentiates [W, b]: its anchor gradient has D + 1 columns
        from .scores.gradient import BatchGradScore

        factors = getattr(det.score_fn, "factors", [det.score_fn])
        with_bias = any(isinstance(f, BatchGradScore) and f.bias for f in factors)
        dims = (det.num_classes, det.input_shape, h.reshape(1, -1).shape[1] + int(with_bias))
        for key, t in state.items():
            if key.rsplit(".", 1)[-1] not in STATE_SHAPES:
                continue  # another fitted score's tensor: its load_state checks it, the key set is checked below
            expected = STATE_SHAPES[key.rsplit(".", 1)[-1]][0](*dims)
            if tuple(t.shape) != expected:
                raise UvoodError(f"{path} is not a valid uvood detector file: state tensor {key!r} has shape "
                                 f"{tuple(t.shape)}, expected {expected} for this model. Fit the detector again.")
            if not t.is_floating_point() and (int(t.min()) < 0 or int(t.max()) >= det.num_classes):
                raise UvoodError(f"{path} is not a valid uvood detector file: state tensor {key!r} holds labels "
                                 f"outside [0, {det.num_classes}). Fit the detector again.")
        det.score_fn.load_state(state)
        if set(det.score_fn.state()) != set(state):
            raise UvoodError(f"{path} is not a valid uvood detector file: score {det.spec!r} keeps the fitted tensors "
                             f"{sorted(det.score_fn.state())} but the file holds {sorted(state)}. Fit it again.")
        return det

    def __repr__(self) -> str:
        return f"Detector(score={self.spec!r}, threshold={self.threshold}, tpr={self.tpr})"
