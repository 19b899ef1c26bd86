"""A detector an engineer wraps around their own model: fit on ID data, score, flag, save, load.

    det = uvood.Detector(model, score="norm(0.3)*energy").fit(id_loader, tpr=0.95)
    det.predict(x)   # BoolTensor, True = OOD
    det.save("det.pt"); det = uvood.Detector.load("det.pt", model)

The threshold keeps ``tpr`` of the ID fitting data: x is flagged OOD when S(x) < threshold.
The file format is ``torch.save`` of plain tensors and a JSON string, loaded with
``weights_only=True`` (no arbitrary pickle).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from .api import score_features, score_model
from .batching import iter_batches
from .cache import atomic_write
from .errors import UvoodError
from .features import model_fingerprint
from .model import (
    eval_mode,
    forward_features,
    head_name,
    input_range,
    model_channels,
    model_dtype,
    parse_dtype,
    resolve_head,
    with_dtype,
)
from .scores.registry import get_score
from .validation import check_images, model_input, warn_range

FORMAT = "uvood-detector"
VERSION = 1


def threshold_for_tpr(id_scores: torch.Tensor, tpr: float) -> float:
    """The largest t with P(S_id >= t) >= tpr: the k-th largest ID score, k = ceil(tpr * n)."""
    s = np.sort(id_scores.detach().cpu().double().numpy())[::-1]
    k = max(1, min(s.size, math.ceil(tpr * s.size - 1e-9)))
    return float(s[k - 1])


class Detector:
    """OOD detector around ``model`` with the score ``score`` (a registry spec string)."""

    def __init__(self, model: torch.nn.Module, score: str = "norm(0.3)*energy", head=None, batch_size: int = 128,
                 dtype=None):
        self.model = model
        self.dtype = parse_dtype(dtype)  # None: the model's own; "float64": batch-independent (uvood.score_model)
        self.score_fn = get_score(score)
        self.spec = self.score_fn.spec
        self.head = resolve_head(model, head)
        self.batch_size = batch_size
        self.threshold: float | None = None
        self.tpr: float | None = None
        self.input_shape: tuple[int, ...] | None = None
        self.num_classes: int | None = None

    # ------------------------------------------------------------------ fitting
    def fit(self, id_data, tpr: float = 0.95, seed: int = 0, progress: bool = False) -> Detector:
        """Set the threshold that keeps ``tpr`` of ``id_data`` (tensor, (x, y) pair or DataLoader).

        Scores that need ID data (BatchGrad) are fitted first, on the same data (with labels).
        """
        if not 0.0 < tpr <= 1.0:
            raise UvoodError(f"tpr must be in (0, 1], got {tpr}.")
        batches = list(iter_batches(id_data, self.batch_size))
        if not batches or sum(x.shape[0] for x, _ in batches) == 0:
            raise UvoodError("id_data is empty: pass at least one in-distribution sample to fit the detector.")
        x = model_input(torch.cat([b[0] for b in batches]), model_dtype(self.model), model_channels(self.model),
                        "id_data")
        ys = [b[1] for b in batches]
        y = torch.cat(ys) if all(t is not None for t in ys) else None
        check_images(x, name="id_data")
        self.input_shape = tuple(x.shape[1:])
        with torch.no_grad(), eval_mode(self.model):
            _, logits = forward_features(self.model, x[:1].float(), self.head)
        self.num_classes = int(logits.shape[1])
        if y is not None and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise UvoodError(f"id_data labels range over [{int(y.min())}, {int(y.max())}] but the model has "
                             f"{self.num_classes} classes: the data and the model do not match.")
        if self.score_fn.needs_fit:
            self.score_fn.fit(self.model, x.float(), y, head=self.head, seed=seed)
        scores = self.score(x, progress=progress)
        self.threshold = threshold_for_tpr(scores, tpr)
        self.tpr = tpr
        return self

    # ------------------------------------------------------------------ scoring
    def _check_input(self, x) -> torch.Tensor:
        x = model_input(x, model_dtype(self.model), model_channels(self.model), "x")
        warn_range(x, input_range(self.model), {}, "x")
        x = check_images(x, expected_channels=self.input_shape[0] if self.input_shape else None, name="x")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise UvoodError(f"x has per-sample shape {tuple(x.shape[1:])} but the detector was fitted on "
                             f"{self.input_shape}. Resize the inputs (uvood.data.transforms.to_model_format).")
        return x

    def score(self, x, progress: bool = False) -> torch.Tensor:
        """S(x) for a batch N x C x H x W; higher = more in-distribution. Returns float64 (N,)."""
        x = self._check_input(x)
        if self.score_fn.needs_model:
            return score_model(self.score_fn, self.model, x, self.batch_size, self.head, progress=progress,
                               dtype=self.dtype)
        model, head = with_dtype(self.model, self.head, self.dtype)
        x = x.to(model_dtype(model))
        hs, zs = [], []
        with torch.no_grad(), eval_mode(model):
            for i in range(0, x.shape[0], self.batch_size):
                h, z = forward_features(model, x[i:i + self.batch_size], head)
                hs.append(h)
                zs.append(z)
        return score_features(self.score_fn, torch.cat(hs), torch.cat(zs))

    def predict(self, x) -> torch.Tensor:
        """BoolTensor (N,): True where x is flagged OOD (S(x) < threshold)."""
        if self.threshold is None:
            raise UvoodError("The detector has no threshold yet: call det.fit(id_data) first.")
        return self.score(x) < self.threshold

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Save spec, threshold, fitted score state and a fingerprint of the model (no pickle)."""
        if self.threshold is None:
            raise UvoodError("Fit the detector before saving it (det.fit(id_data)).")
        meta = {"format": FORMAT, "version": VERSION, "spec": self.spec, "threshold": self.threshold,
                "tpr": self.tpr, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "head": head_name(self.model, self.head) if self.head is not None else None,
                "batch_size": self.batch_size, "model_sha256": model_fingerprint(self.model),
                "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch.")}
        payload = {"meta": json.dumps(meta), "state": {k: v.detach().cpu() for k, v in self.score_fn.state().items()}}
        atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path, model: torch.nn.Module, strict: bool = True) -> Detector:
        """Load a saved detector onto ``model``; refuses a model with other weights if ``strict``."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(payload["meta"])
        except FileNotFoundError:
            raise UvoodError(f"No detector file at {path}.") from None
        except Exception as e:
            raise UvoodError(f"{path} is not a valid uvood detector file ({e}).") from None
        if meta.get("format") != FORMAT:
            raise UvoodError(f"{path} is not a uvood detector file (format {meta.get('format')!r}).")
        det = cls(model, score=meta["spec"], head=meta["head"], batch_size=meta.get("batch_size", 128),
                  dtype=meta.get("dtype"))
        fp = model_fingerprint(model)
        if fp != meta["model_sha256"]:
            msg = (f"The model's weights differ from those the detector at {path} was fitted with; "
                   "its threshold would be meaningless. Refit it, or pass strict=False to load anyway.")
            if strict:
                raise UvoodError(msg)
        det.threshold, det.tpr = meta["threshold"], meta["tpr"]
        det.input_shape, det.num_classes = tuple(meta["input_shape"]), meta["num_classes"]
        x0 = torch.zeros((1, *det.input_shape))
        with torch.no_grad(), eval_mode(model):
            _, logits = forward_features(model, x0, det.head)
        if logits.shape[1] != det.num_classes:
            raise UvoodError(f"The detector was fitted for {det.num_classes} classes but the model has "
                             f"{logits.shape[1]}: load it onto the model it was fitted with.")
        det.score_fn.load_state(payload.get("state", {}))
        return det

    def __repr__(self) -> str:
        return f"Detector(score={self.spec!r}, threshold={self.threshold}, tpr={self.tpr})"
