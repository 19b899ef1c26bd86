"""Run a benchmark spec: data -> model features (cached) -> scores (cached) -> metrics rows.

Data sets are identified without reading them (:class:`Inputs`); features are extracted once per
(model, data set, transform) and cached; the scores computed from features are cached in one file
per feature set; the deep per-label norms once per data set; the other scores that need the model
(deep gradients, BatchGrad) per score. A warm rerun reads no image and only reads caches.

Every cache key carries the version of the code that produced the values: the feature format
(``features.FORMAT_VERSION``), each score's registry versions (``Score.version_tag``), the deep
label norms' (``gradient.LABEL_NORMS_VERSION``) and the metrics' (``metrics.METRICS_VERSION``); deep rows also
the path of the convolution weight-gradient norms (``conv_kernel.tag()``: the compiled kernel or torch's).
Bumping one recomputes exactly what it produced; the rest is read from the caches.

Runs sharing a cache folder claim each item with a lock file (:func:`uvood.cache.claim`): a second
run waits for the item another run is computing and then reads it, instead of redoing the work.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import data as uvdata
from .. import metrics, precision, zoo
from ..api import score_model
from ..cache import atomic_write, claim, default_cache_dir, load_verified, peek, save_verified
from ..data import transforms
from ..devices import probe
from ..distributed import all_gather, map_shards
from ..errors import UvoodError
from ..features import FORMAT_VERSION as FEATURES_VERSION
from ..features import extract, model_fingerprint
from ..scores import conv_kernel, fused
from ..scores.gradient import (
    DEEP_BATCH_SIZE,
    LABEL_NORMS_VERSION,
    GradScore,
    check_head_bias,
    mean_of_norm_from_label_norms,
)
from ..scores.registry import get_score
from ..user_model import load_user_model
from .scoresets import depth_of, rows_for
from .spec import BenchSpec

COLUMNS = ["benchmark", "id", "ood", "score", "depth", "auroc", "fpr95", "aupr_in", "aupr_out", "ci_low",
           "ci_high", "n_id", "n_ood"]


class Upsample(nn.Module):
    """Bilinear upsampling to ``size`` px in front of a model (the 64 px -> 224 px pipeline)."""

    def __init__(self, model: nn.Module, size: int = 224):
        super().__init__()
        self.size = size
        self.model = model

    def forward(self, x):
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.model(x.clamp(0, 1))


@dataclass
class RunResult:
    spec: BenchSpec
    rows: list[dict]
    scores: dict[tuple[str, str, str], np.ndarray]
    models: dict[str, dict]
    datasets: dict[str, dict]
    timings: dict[str, float] = field(default_factory=dict)
    quick: bool = False
    meta: dict = field(default_factory=dict)
    #: (ID set, score spec) -> why the score cannot be fitted on that ID set's training data (no rows for it)
    not_applicable: dict[tuple[str, str], str] = field(default_factory=dict)


def _precision_tag() -> str:
    """What ``--precision bfloat16`` adds to the names of the files it computes (features, feature scores), so that
    bfloat16 and float32 runs keep their own files (their keys differ too): nothing for float32."""
    return "".join(f"__{k}" for k in precision.key(precision.parse(None)))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")[:120]


def _load_user_model(name: str, spec: BenchSpec) -> tuple[nn.Module, dict]:
    """``module.path:factory`` -> factory() in eval mode; its input shape comes from the spec's ``input``."""
    model = load_user_model(name)
    if not spec.input:
        raise UvoodError(f"Benchmark {spec.name}: a user model ({name}) needs \"input\": [C, H, W] in the spec.")
    return model, {"input": list(spec.input), "model": name}


def _load_model(name: str, spec: BenchSpec) -> tuple[nn.Module, dict, tuple[int, int, int]]:
    convention = spec.cross_domain
    model, info = _load_user_model(name, spec) if ":" in name else (zoo.load(name), zoo.info(name))
    c, h, w = info["input"]
    if convention == "imagenet64":
        return Upsample(model, h), info, (c, 64, 64)
    return model, info, (c, h, w)


class Inputs:
    """One data set in the model's input format, identified without reading it: the images are
    decoded and transformed only when a cache misses (``x``), so a warm rerun reads no image."""

    def __init__(self, identity: str, desc: str, load):
        self.identity, self.desc, self._load = identity, desc, load

    @functools.cached_property
    def _loaded(self) -> tuple[torch.Tensor, np.ndarray]:
        return self._load()

    @property
    def loaded(self) -> bool:
        """Whether the images were read (some cache missed)."""
        return "_loaded" in self.__dict__

    @property
    def x(self) -> torch.Tensor:
        return self._loaded[0]

    @property
    def y(self) -> np.ndarray:
        return self._loaded[1]

    def subset(self, n_total: int, k: int) -> Inputs:
        """``k`` evenly spaced images of the ``n_total`` (the ``--deep-n`` subsets)."""
        keep = uvdata.datasets.subset_indices(n_total, k)
        return Inputs(self.identity + f",deep_n={k}", self.desc, lambda: (self.x[torch.from_numpy(keep)], self.y[keep]))


def _prepare(spec: BenchSpec, name: str, in_shape, n: int, data_dir, ds: dict | None = None) -> Inputs:
    """Data set ``name`` of ``spec`` (or the entry ``ds``) in the model's input format (lazy: see :class:`Inputs`)."""
    ds = ds or spec.datasets[name]
    c, h, _ = in_shape
    n = min(n, ds.get("n", n))  # a data set may cap its own count (e.g. the far-OOD sets of `large`)
    mode = "resize" if spec.cross_domain in ("resize", "imagenet64") else spec.cross_domain
    desc = f"{spec.cross_domain}:{c}x{h}x{h}"
    eval_transform = spec.cross_domain == "imagenet"  # each image at its own size -> the model's ImageNet transform

    def to_model(images) -> torch.Tensor:
        if eval_transform:
            return transforms.imagenet_eval(images, h)
        return transforms.to_model_format(images, channels=c, size=h, mode=mode)

    if "folder" in ds:  # a user's ImageFolder layout (e.g. the official ImageNet benchmark's OOD sets)
        size = None if eval_transform else h  # the ImageNet transform takes each image at its own size
        identity, _, count = uvdata.datasets.folder_identity(ds["folder"], size=size)
        keep = uvdata.datasets.subset_indices(count, n)
        if keep is not None:
            identity += f",limit={n}"

        def load_folder() -> tuple[torch.Tensor, np.ndarray]:
            imgs = uvdata.datasets.image_folder(ds["folder"], size=size)
            if keep is None:
                return to_model(imgs.x), imgs.y
            return to_model([imgs.x[i] for i in keep] if size is None else imgs.x[keep]), imgs.y[keep]

        return Inputs(identity, desc, load_folder)
    size = h if uvdata.info(ds["dataset"]).hwc is None and not eval_transform else None
    identity = uvdata.datasets.identity(ds["dataset"], ds["split"], data_dir=data_dir, limit=n, size=size)

    def load_named() -> tuple[torch.Tensor, np.ndarray]:
        imgs = uvdata.load(ds["dataset"], ds["split"], data_dir=data_dir, limit=n, size=size)
        if imgs.identity != identity:
            raise UvoodError(f"internal: lazy identity {identity!r} differs from the loaded {imgs.identity!r}.")
        return to_model(imgs.x), imgs.y

    return Inputs(identity, desc, load_named)


def _feature_scores(scores: list, f, key: str, path: Path, fits: dict | None = None) -> dict[str, np.ndarray]:
    """Every score computed from the features ``f`` (no model), cached in one file per feature set:
    cheap ones and a few costly ones (the heatmap's fractional norms, shallow BatchGrad). A score fitted on
    cached ID training features (``fits``: score -> :class:`FitOnFeatures`) is fitted only on a cache miss."""
    fits = fits or {}
    keyed = {_score_key(sc, fits.get(sc)): sc for sc in scores}
    cached = load_verified(path, key, "Score cache") or {}
    if _agreed({k for k in keyed if k not in cached}, "the feature-score cache lookup"):
        with claim(path):
            cached = load_verified(path, key, "Score cache") or {}  # another run may have added some meanwhile
            if any(isinstance(fits.get(keyed[k]), ModelFit) for k in keyed if k not in cached):
                for fit in {fits[sc] for sc in scores if isinstance(fits.get(sc), ModelFit)}:
                    fit.ensure()  # a value to compute needs its state; a digest read from a stale file is corrected
                keyed = {_score_key(sc, fits.get(sc)): sc for sc in scores}
            # under torchrun every rank computes the keys missing on any rank, in one order: a fit may extract the
            # training features, which all ranks must do together (a collective), even on a rank that had them
            agreed = _agreed({k for k in keyed if k not in cached}, "the feature-score cache lookup")
            missing = [k for k in keyed if k in agreed]
            for k in missing:
                if isinstance(fits.get(keyed[k]), FitOnFeatures):
                    try:
                        fits[keyed[k]].ensure()
                    except UvoodError:
                        continue  # not applicable here: the reason is on the FitOnFeatures, reported by the run
                cached[k] = _from_features(keyed[k], f)
            if missing:
                save_verified(path, key, cached)
    return {k: cached[k] for k in keyed if k in cached}


def _from_features(score, f) -> np.ndarray:
    """One score's values from cached features (a cache miss)."""
    return score.from_features(f.h, f.logits).numpy()


def _score_key(score, fit=None) -> str:
    """A score's entry in the feature-score cache: spec, code versions, and what it was fitted on: the key of
    the ID training features it is fitted on (``fit``, a :class:`FitOnFeatures`), else its fitted state (the
    digest a :class:`ModelFit` holds, or the state's own)."""
    if isinstance(fit, ModelFit):
        return f"{score.spec}@{score.version_tag}|{fit.digest}"
    if fit is not None:
        return f"{score.spec}@{score.version_tag}|fit:{fit.key}"
    return f"{score.spec}@{score.version_tag}" + ("|" + _fit_state_digest(score) if score.needs_fit else "")


def fits_on_features(score) -> bool:
    """Whether ``score`` is fitted on cached ID features (the field's feature-statistics and shaping scores),
    not on the model and its inputs (BatchGrad)."""
    from ..scores.fitted import FittedScore, factors

    return score.needs_fit and not score.needs_model and all(
        isinstance(f, FittedScore) for f in factors(score) if f.needs_fit)


class FitOnFeatures:
    """Fits one score, when first needed, on the ID training features of a model (a cache miss): a warm
    rerun neither reads the training features nor fits. ``key`` identifies the training features (model,
    images, transform) and enters the score's cache keys; ``reason`` is set when the score cannot be fitted
    on them (e.g. class-conditional statistics with classes absent): the score is then not applicable."""

    def __init__(self, score, key: str, features, head):
        self.score, self.key, self._features, self._head = score, key, features, head
        self.fitted, self.reason = False, None

    def ensure(self) -> None:
        """Fit (once); raise :class:`UvoodError` with the reason when the score cannot be fitted here."""
        if self.reason:
            raise UvoodError(self.reason)
        if self.fitted:
            return
        from ..scores.fitted import fit_on_features

        f = self._features()
        w, b = self._head()
        try:
            fit_on_features(self.score, f.h, f.logits, f.y, weight=w, bias=b)
        except UvoodError as e:
            self.reason = str(e)
            raise
        self.fitted = True


def _chunked(fn, x: torch.Tensor, chunk: int, progress: bool, desc: str) -> list:
    """``fn`` on ``x`` in slices of ``chunk`` images, with a progress bar that counts images. The slices are the
    batches one call would use (``chunk`` = its batch size), so the values are the same as one call's.
    Under ``torchrun`` each rank computes a contiguous share of the slices and every rank gets them all
    (:func:`uvood.distributed.map_shards`): the same slices, so the same values, in about 1/N of the time."""
    from tqdm.auto import tqdm

    n = x.shape[0]
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        def one(k: int):
            out = fn(x[k * chunk:(k + 1) * chunk])
            bar.update(min(chunk, n - k * chunk))
            return out

        return map_shards(one, -(-n // chunk), desc)


def _shares_label_norms(score) -> bool:
    return isinstance(score, GradScore) and score.depth == "deep" and score.agg == "mean_of_norm"


def _deep_entry(fp: str, inputs: Inputs, model_name: str, cache: Path, score, digest: str | None = None
                ) -> tuple[str, Path, tuple]:
    """(cache key, cache path, what) of one score that needs the model: a deep ``mean_of_norm`` row reads the
    per-label norms at its T (``what = ("label", T)``), every other one its own entry (``("score", spec)``).
    ``digest``: the score's :func:`_fit_state_digest` when the caller has it (hashing a deep low-dim subspace
    costs tens of ms, so a run hashes each fitted state once per model, not once per data set)."""
    if _shares_label_norms(score):
        key = hashlib.sha256(json.dumps([fp, inputs.identity, inputs.desc, "label-norms", score.T,
                                         LABEL_NORMS_VERSION, conv_kernel.tag()]).encode()).hexdigest()
        return key, cache / f"labelnorms-{_slug(f'{model_name}__{inputs.identity}__T={score.T}')}.npz", \
            ("label", score.T)
    engine_tag = conv_kernel.tag() if getattr(score, "depth", None) == "deep" else None  # which conv path
    key = hashlib.sha256(json.dumps([fp, inputs.identity, inputs.desc, score.spec, score.version_tag,
                                     digest or _fit_state_digest(score)] + ([engine_tag] if engine_tag else [])
                                    ).encode()).hexdigest()
    return key, cache / f"scores-{_slug(model_name + '__' + inputs.identity + '__' + score.spec)}.npz", \
        ("score", score.spec)


def _what(what: tuple) -> str:
    return "Label-norm cache" if what[0] == "label" else "Score cache"


def _deep_scores(scores: dict, model, model_name: str, fp: str, inputs: Inputs, cache: Path, progress: bool,
                 max_memory: int | None = None, digests: dict | None = None, ensure=None) -> dict[str, np.ndarray]:
    """The values of every score that needs the model (``{full spec: score}``) on ``inputs``.

    Cache entries stay per score (:func:`_deep_entry`: a bumped score version recomputes that score, the
    per-label norms carry ``LABEL_NORMS_VERSION``); what misses is computed in ONE fused deep pass
    (:func:`uvood.scores.fused.deep_pass`: one forward and one set of C label cotangents per micro-batch for
    every deep row, BatchGrad included; the predicted-label norm-of-mean rows from their closed form 0).
    The missing entries are claimed together, in sorted order (two runs never wait on each other in a cycle).
    ``digests``: the fitted states' digests (keys of the entries) known without loading the states; ``ensure``:
    called before a pass (every rank together), it loads the fitted states and returns their digests; should
    one differ from ``digests`` (a stale fit file), the lookup is made again with the right keys.
    """
    digests = digests or {}
    entries = {full: _deep_entry(fp, inputs, model_name, cache, sc, digests.get(full)) for full, sc in scores.items()}
    by_path = {path: (key, what) for key, path, what in entries.values()}
    found = {path: load_verified(path, key, _what(w)) for path, (key, w) in by_path.items()}
    missing = _agreed({p for p, v in found.items() if v is None}, "the deep-score cache lookup")
    if missing and ensure is not None:
        fresh = ensure()
        if fresh != {full: digests.get(full) for full in fresh}:
            return _deep_scores(scores, model, model_name, fp, inputs, cache, progress, max_memory, fresh)
    if missing:
        with contextlib.ExitStack() as stack:
            for path in sorted(missing):
                stack.enter_context(claim(path))
            for path in missing:  # made by another run while we waited?
                found[path] = load_verified(path, by_path[path][0], _what(by_path[path][1]))
            todo = {path: by_path[path] for path in sorted(_agreed({p for p in missing if found[p] is None},
                                                                   "the deep-score cache lookup"))}
            if todo:
                found.update(_compute_deep(todo, scores, model, inputs, progress, max_memory))
    out = {}
    for full, sc in scores.items():
        got = found[entries[full][1]]
        if _shares_label_norms(sc):
            raw = mean_of_norm_from_label_norms(torch.from_numpy(got[sc.norm]), torch.from_numpy(got["logits"]),
                                                label=sc.label, weight=sc.weight, T=sc.T, official=sc.official)
            out[full] = (sc.sign * raw).numpy()
        else:
            out[full] = got["s"]
    return out


def _agreed(missing: set, what: str) -> set:
    """The cache entries missing on any rank (under ``torchrun``; ``missing`` itself otherwise): every rank then
    computes the same entries together (:func:`_chunked`), even when a file appeared between their lookups."""
    return set().union(*all_gather(missing, what))


def _compute_deep(todo: dict, scores: dict, model, inputs: Inputs, progress: bool, max_memory: int | None) -> dict:
    """Compute and save the cache entries ``todo`` (``{path: (key, what)}``): the fusable scores and the label
    norms in one fused pass over the images, other model scores (products with a deep factor) one by one."""
    by_spec = {sc.spec: sc for sc in scores.values()}
    temps = sorted({what[1] for _, what in todo.values() if what[0] == "label"})
    fus = [by_spec[what[1]] for _, what in todo.values() if what[0] == "score" and fused.fusable(by_spec[what[1]])]
    done: dict = {}
    if fus or temps:
        parts = _chunked(lambda xb: fused.deep_pass(model, xb, fus, label_norms=temps, batch_size=DEEP_BATCH_SIZE,
                                                    max_memory=max_memory),
                         inputs.x, DEEP_BATCH_SIZE, progress, f"fused deep pass, {inputs.identity}")
        for path, (_, what) in todo.items():
            if what[0] == "label":
                done[path] = {nm: torch.cat([p.label_norms[what[1]][nm] for p in parts], dim=1).numpy()
                              for nm in ("l1", "l2sq")}
                done[path]["logits"] = torch.cat([p.logits for p in parts]).numpy()
            elif fused.fusable(by_spec[what[1]]):
                done[path] = {"s": torch.cat([p.scores[what[1]] for p in parts]).numpy()}
    for path, (_, what) in todo.items():
        if path not in done:
            sc = by_spec[what[1]]
            done[path] = {"s": torch.cat(_chunked(lambda xb, sc=sc: score_model(sc, model, xb, batch_size=64),
                                                  inputs.x, 64, progress, f"{sc.spec}, {inputs.identity}")).numpy()}
    for path, (key, _) in todo.items():
        save_verified(path, key, done[path])
    return done


def _read_memo(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        path.unlink(missing_ok=True)  # a broken memo is only a lost speed-up
        return {}


def _write_memo(path: Path, memo: dict) -> None:
    """Merge ``memo`` into the file (another run may have added entries since we read it), atomically."""
    with claim(path):
        merged = {**_read_memo(path), **memo}
        atomic_write(path, lambda f: f.write(json.dumps(merged).encode()))


def _evaluate_missing(todo: dict, n_boot: int) -> dict:
    """``{digest: metrics.evaluate(ID scores, OOD scores, ci=True)}`` for every ``{digest: (ID, OOD)}`` of ``todo``
    (bootstrap intervals cost ~0.5 s per 10k x 10k pair), on ``torch.get_num_threads()`` threads: numpy releases
    the GIL in most of the bootstrap's work, and each pair's resamples are seeded alone (seed 0), so the values
    do not depend on the threads."""
    from concurrent.futures import ThreadPoolExecutor

    def one(pair):
        return metrics.evaluate(*pair, ci=True, n_boot=n_boot, seed=0)

    if len(todo) < 2 or torch.get_num_threads() < 2:
        return {d: one(p) for d, p in todo.items()}
    with ThreadPoolExecutor(min(len(todo), torch.get_num_threads())) as pool:
        return dict(zip(todo, pool.map(one, todo.values())))


def _fit_state_digest(score) -> str:
    d = hashlib.sha256()
    for k, v in sorted(score.state().items()):
        d.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return d.hexdigest()[:16]


def _accuracy(dataset: str | None, logits: torch.Tensor, y: np.ndarray, data_dir) -> float | None:
    """Top-1 accuracy of the ID predictions, mapping Tiny-ImageNet labels to ImageNet-1k indices."""
    y = torch.as_tensor(y)
    if len(y) == 0 or (y < 0).any():
        return None
    if dataset == "tinyimagenet" and logits.shape[1] == 1000:
        from ..zoo.efficientnet import tinyimagenet_to_imagenet

        y = torch.as_tensor(tinyimagenet_to_imagenet(uvdata.data_dir(data_dir)))[y]
    elif dataset is None or logits.shape[1] != uvdata.info(dataset).num_classes:
        return None
    return float((logits.argmax(1) == y).float().mean())


def _feature_fits(spec: BenchSpec, id_name: str, model, model_name: str, fp: str, in_shape, fit_n, data_dir,
                  cache: Path, progress: bool, log, scores: list, timings: dict) -> dict:
    """score -> :class:`FitOnFeatures` for every score of ``scores`` fitted on cached ID features. The
    ID training split (``train_split`` of the ID set, default ``train``; ``fit_n`` evenly spaced images,
    None = all) is read and its features extracted (cached) only when a fitted score's value is missing."""
    from ..scores.fitted import head_weights

    todo = list(dict.fromkeys(sc for sc in scores if fits_on_features(sc)))
    if not todo:
        return {}
    ds = spec.datasets[id_name]
    if "dataset" not in ds:
        reason = (f"{id_name} has no named data set, so there is no ID training split to fit on (give the ID set a "
                  "\"dataset\" with a \"train_split\" in the spec)")
        out = {sc: FitOnFeatures(sc, "none", None, None) for sc in todo}
        for f in out.values():
            f.reason = reason
        return out
    train_ds = {"dataset": ds["dataset"], "split": ds.get("train_split", "train")}
    inputs = _prepare(spec, id_name, in_shape, fit_n or 10**9, data_dir, ds=train_ds)
    name = _slug(f"{model_name}__{inputs.identity}__{inputs.desc}{_precision_tag()}")
    key = hashlib.sha256(json.dumps([fp, inputs.identity, inputs.desc, FEATURES_VERSION,
                                     *precision.key(precision.parse(None))]).encode()).hexdigest()[:16]

    @functools.cache
    def features():
        t = time.time()
        with claim(cache / f"features-{name}.npz", log=log):
            f = extract(model, lambda: (inputs.x, torch.as_tensor(inputs.y)), batch_size=128, cache_dir=cache,
                        data_id=inputs.identity, transform=inputs.desc, progress=progress,
                        desc=f"{model_name} on {id_name} training split", cache_name=name)
        timings[f"{model_name}/{id_name}/training split features"] = round(time.time() - t, 2)
        return f

    def head():
        return head_weights(model, probe(model, (1, *in_shape)))

    return {sc: FitOnFeatures(sc, key, features, head) for sc in todo}


#: ID training images a model score (deep BatchGrad's anchors, deep low-dim's subspace) is fitted on, evenly
#: spaced; ``--quick`` fits on the spec's ``quick_n`` (the deep low-dim fit costs a few passes per image)
MODEL_FIT_N = 2000


class ModelFit:
    """The fit of ``sc`` (a score that needs the model and ID training data: deep BatchGrad's anchors, deep
    low-dim's subspace) on ``limit`` evenly spaced images of the ID set's training split, loaded or made only
    when needed.

    The fitted state is cached (keyed by the model's fingerprint, the training data's identity, the score's
    spec and version and the seed) together with ``digest``, the :func:`_fit_state_digest` of the state that
    enters the score's deep cache keys. A warm rerun reads that digest alone (:func:`uvood.cache.peek`, 16
    characters, where the deep low-dim subspace is tens of MB) and loads the state (:meth:`ensure`) only when
    a deep entry misses; neither decodes a training image nor fits again. A file written before the digest was
    stored in it is loaded once and rewritten with it."""

    def __init__(self, sc, model, model_name: str, fp: str, ds: dict, in_shape, data_dir, cache: Path,
                 limit: int = MODEL_FIT_N, timings: dict | None = None, timing_key: str = ""):
        split = ds.get("train_split", "train")
        self.sc, self.model, self.ds, self.split, self.in_shape = sc, model, ds, split, in_shape
        self.data_dir, self.limit, self.timings, self.timing_key = data_dir, limit, timings, timing_key
        ident = uvdata.datasets.identity(ds["dataset"], split, data_dir=data_dir, limit=limit)
        what = [fp, ident, list(in_shape), sc.spec, sc.version_tag, "seed=0"]
        self.key = hashlib.sha256(json.dumps(what).encode()).hexdigest()
        self.path = cache / f"fit-{_slug(f'{model_name}__{sc.spec}__{ident}')}.npz"
        self._digest, self._loaded = None, False

    @property
    def digest(self) -> str:
        """:func:`_fit_state_digest` of the fitted state: read from the fit cache, else fitted or loaded first."""
        if self._digest is None:
            self._digest = peek(self.path, self.key, "state_digest")
        if self._digest is None:
            self.ensure()
        return self._digest

    def ensure(self) -> None:
        """Load the fitted state into the score (fitting and caching it on a miss), once."""
        if self._loaded:
            return
        t = time.time()
        state = load_verified(self.path, self.key, "Fit cache")
        if state is None:
            with claim(self.path):
                state = load_verified(self.path, self.key, "Fit cache")  # made by another run while we waited?
                if state is None:
                    train = uvdata.load(self.ds["dataset"], self.split, data_dir=self.data_dir, limit=self.limit)
                    xt = transforms.to_model_format(train.x, channels=self.in_shape[0], size=self.in_shape[1])
                    self.sc.fit(self.model, xt, torch.as_tensor(train.y), seed=0)
                    state = {k: v.detach().cpu().numpy() for k, v in self.sc.state().items()}
                    state["state_digest"] = np.array(_fit_state_digest(self.sc))
                    save_verified(self.path, self.key, state)
        stored = state.pop("state_digest", None)
        self.sc.load_state({k: torch.from_numpy(v) for k, v in state.items()})
        self._digest = str(stored) if stored is not None else _fit_state_digest(self.sc)
        if stored is None:  # written before the digest was stored beside the state
            save_verified(self.path, self.key, {**state, "state_digest": np.array(self._digest)})
        self._loaded = True
        if self.timings is not None:
            self.timings[self.timing_key] = round(self.timings.get(self.timing_key, 0.0) + time.time() - t, 2)


def _fit_digests(deep: dict, model_fits: dict, load: bool = False) -> dict[str, str]:
    """``{full spec: digest of its fitted state}`` of the model scores ``deep``; ``load``: load (or fit) every
    fitted state first, as a deep pass needs them (a digest read from a stale file is then corrected)."""
    if load:
        for mf in model_fits.values():
            mf.ensure()
    return {full: model_fits[full].digest if full in model_fits else _fit_state_digest(sc) for full, sc in deep.items()}


def run(spec: BenchSpec, scores: list[str] | None = None, quick: bool = False, n: int | None = None,
        data_dir=None, cache_dir=None, progress: bool = True, log=print, n_boot: int = 1000,
        deep_n: int | None = None, max_memory: int | None = None) -> RunResult:
    """Run ``spec`` and return every (pair, score) row with the metrics of :data:`COLUMNS`.

    ``deep_n`` evaluates the scores that need the model (deep gradients, BatchGrad) on an evenly
    spaced subset of that many images per set (their rows' n_id / n_ood say so); None = all.
    ``max_memory``: the deep pass's memory budget in bytes (None: the engine's default, near what a forward +
    backward of the batch holds).
    """
    t_start = time.time()
    n = n or (spec.quick_n if quick else spec.n)
    deep_n = deep_n or (spec.quick_deep_n if quick else spec.deep_n)
    fit_n = spec.quick_fit_n if quick else spec.fit_n
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if scores:
        rows_spec = [(s, get_score(s).spec, depth_of(s)) for s in scores]
    else:
        rows_spec = rows_for(spec.groups, deep=spec.deep)
    score_objs = {full: get_score(full) for _, full, _ in rows_spec}
    all_scores: dict[tuple[str, str, str], np.ndarray] = {}
    models, datasets, timings, feature_sets = {}, {}, {}, []
    not_applicable: dict[tuple[str, str], str] = {}  # (ID set, score) -> why it cannot be fitted there
    for id_name, model_name in spec.models.items():
        t0 = time.time()
        model, info, in_shape = _load_model(model_name, spec)
        if "dataset" in spec.datasets[id_name] and info.get("num_classes"):  # fail before any work
            uvdata.datasets.check_model_classes(spec.datasets[id_name]["dataset"], info["num_classes"], model_name)
        fp = model_fingerprint(model)
        with_bias = [sc for sc in score_objs.values()  # bias=true needs a head bias (a gradient flag)
                     if any(getattr(t, "bias", False) is True for t in getattr(sc, "factors", [sc]))]
        if with_bias:  # one look at the model's head serves every score (each look runs the model)
            check_head_bias(with_bias[0], model, probe(model, (1, *in_shape)))
        needed = [id_name] + [o for i, o in spec.pairs if i == id_name]
        feats = {}
        for ds_name in needed:
            inputs = _prepare(spec, ds_name, in_shape, n, data_dir)
            t = time.time()
            name = _slug(f"{model_name}__{inputs.identity}__{inputs.desc}{_precision_tag()}")
            with claim(cache / f"features-{name}.npz", log=log):
                f = extract(model, lambda inputs=inputs: (inputs.x, torch.as_tensor(inputs.y)), batch_size=128,
                            cache_dir=cache, data_id=inputs.identity, transform=inputs.desc, progress=progress,
                            desc=f"{model_name} on {ds_name}", cache_name=name)
            timings[f"{model_name}/{ds_name}/features"] = round(time.time() - t, 2)
            feature_sets.append(inputs.loaded)
            feats[ds_name] = (f, inputs)
            datasets.setdefault(ds_name, {"identity": inputs.identity, "n": len(f)})
        f_id = feats[id_name][0]
        if "dataset" in spec.datasets[id_name]:  # e.g. ImageNet-1k photos need a 1,000-class model
            uvdata.datasets.check_model_classes(spec.datasets[id_name]["dataset"], f_id.logits.shape[1], model_name)
        acc = _accuracy(spec.datasets[id_name].get("dataset"), f_id.logits,
                        f_id.y.numpy() if f_id.y is not None else np.zeros(0), data_dir)
        models[id_name] = {"model": model_name, "fingerprint": fp, "accuracy_on_id": acc, "n": len(f_id),
                           "cpu_fallback": info.get("cpu_fallback", False), "c": info.get("c"),
                           "test_accuracy": info.get("test_accuracy"), "device": info.get("device")}
        model_fits: dict[str, ModelFit] = {}  # full spec -> its fit, loaded only when a deep entry misses
        fits = _feature_fits(spec, id_name, model, model_name, fp, in_shape, fit_n, data_dir, cache, progress, log,
                             [score_objs[full] for _, full, _ in rows_spec], timings)
        for _label, full, _depth in rows_spec:
            sc = score_objs[full]
            if sc.needs_fit and sc not in fits:
                ds = spec.datasets[id_name]
                if "dataset" not in ds:
                    raise UvoodError(f"{sc.spec} needs labelled ID training data; {id_name} has no named data set.")
                limit = min(spec.quick_n, spec.quick_model_fit_n or spec.quick_n, MODEL_FIT_N) if quick else MODEL_FIT_N
                model_fits[full] = ModelFit(sc, model, model_name, fp, ds, in_shape, data_dir, cache, limit=limit,
                                            timings=timings, timing_key=f"{model_name}/{id_name}/fits of model scores")
        from_features = [score_objs[full] for _, full, _ in rows_spec if not score_objs[full].needs_model]
        digests = None
        for ds_name, (f, inputs) in feats.items():
            fkey = hashlib.sha256(json.dumps([fp, inputs.identity, inputs.desc, "feature-scores",
                                              FEATURES_VERSION, *precision.key(precision.parse(None))]).encode())
            path = cache / f"fscores-{_slug(f'{model_name}__{inputs.identity}__{inputs.desc}{_precision_tag()}')}.npz"
            t, train_key = time.time(), f"{model_name}/{id_name}/training split features"
            before = timings.get(train_key, 0.0)
            values = _feature_scores(from_features, f, fkey.hexdigest(), path,
                                     {**fits, **{mf.sc: mf for mf in model_fits.values()}})
            # the training split's features are extracted lazily inside the fits: counted on their own line only
            timings[f"{model_name}/{ds_name}/scores from features"] = round(
                time.time() - t - (timings.get(train_key, 0.0) - before), 2)
            for _label, full, _depth in rows_spec:
                sc = score_objs[full]
                if sc in fits and fits[sc].reason:
                    not_applicable[(id_name, full)] = fits[sc].reason
                    continue
                if not sc.needs_model:
                    all_scores[(id_name, ds_name, full)] = values[_score_key(sc, fits.get(sc, model_fits.get(full)))]
            deep = {full: score_objs[full] for _, full, _ in rows_spec if score_objs[full].needs_model}
            if deep:
                x = inputs.subset(len(f), deep_n) if deep_n and deep_n < len(f) else inputs
                t, fit_key = time.time(), f"{model_name}/{id_name}/fits of model scores"
                fitted_before = timings.get(fit_key, 0.0)
                if digests is None:  # once per model: the fits do not change while its data sets are scored
                    digests = _fit_digests(deep, model_fits)
                values = _deep_scores(deep, model, model_name, fp, x, cache, progress, max_memory, digests,
                                      ensure=functools.partial(_fit_digests, deep, model_fits, load=True))
                # the model scores' fits run inside (ensure): counted on their own line only
                timings[f"{model_name}/{ds_name}/fused deep pass"] = round(
                    time.time() - t - (timings.get(fit_key, 0.0) - fitted_before), 2)
                for full, s in values.items():
                    all_scores[(id_name, ds_name, full)] = s
        timings[f"{model_name}/all"] = round(time.time() - t0, 1)
        log(f"[{spec.name}] {id_name} ({model_name}): done in {time.time() - t0:.0f} s")
    rows, t = [], time.time()
    memo_path = cache / f"metrics-{_slug(spec.name)}.json"
    memo = _read_memo(memo_path)
    pairs = []  # (ID set, OOD set, row label, score, depth, digest, ID scores, OOD scores), in the report's order
    for id_name, ood_name in spec.pairs:
        for label, full, depth in rows_spec:
            if (id_name, full) in not_applicable:
                continue  # reported with its reason (RunResult.not_applicable), never silently dropped
            s_id, s_ood = all_scores[(id_name, id_name, full)], all_scores[(id_name, ood_name, full)]
            digest = hashlib.sha256(s_id.tobytes() + b"|" + s_ood.tobytes()
                                    + f"|{n_boot}|metrics:{metrics.METRICS_VERSION}".encode()).hexdigest()
            pairs.append((id_name, ood_name, label, full, depth, digest, s_id, s_ood))
    memo |= _evaluate_missing({d: (a, b) for *_, d, a, b in pairs if d not in memo}, n_boot)
    for id_name, ood_name, label, full, depth, digest, s_id, s_ood in pairs:
        m = memo[digest]
        rows.append({"benchmark": spec.name, "id": id_name, "ood": ood_name, "score": full, "depth": depth,
                     "auroc": m["auroc"], "fpr95": metrics.fpr_at_tpr(s_id, s_ood, spec.metric["tpr"],
                                                                        spec.metric["fpr_positive"]),
                     "aupr_in": m["aupr_in"], "aupr_out": m["aupr_out"], "ci_low": m["ci_low"],
                     "ci_high": m["ci_high"], "n_id": len(s_id), "n_ood": len(s_ood), "label": label})
    _write_memo(memo_path, memo)
    timings["metrics and bootstrap intervals"] = round(time.time() - t, 1)
    timings["total"] = round(time.time() - t_start, 1)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}".strip(", "),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "n_per_set": n,
            "cross_domain": spec.cross_domain, "metric": spec.metric, "deep_n": deep_n, "quick": quick,
            "scores": scores, "n_boot": n_boot, "feature_sets": len(feature_sets), "fit_n": fit_n,
            "max_memory": max_memory, "precision": precision.parse(None),
            "feature_sets_computed": sum(feature_sets),
            "versions": {"features": FEATURES_VERSION, "label_norms": LABEL_NORMS_VERSION,
                         "conv_weight_norms": conv_kernel.tag(),
                         "metrics": metrics.METRICS_VERSION,
                         "scores": {full: score_objs[full].version_tag for _, full, _ in rows_spec}}}
    return RunResult(spec, rows, all_scores, models, datasets, timings, quick, meta, not_applicable)


def check_known(spec: BenchSpec, scores: list[str] | None) -> None:
    """Fail early, before any work, on unknown score names."""
    for s in scores or []:
        try:
            get_score(s)
        except UvoodError as e:
            raise UvoodError(f"--scores: {e}") from None
