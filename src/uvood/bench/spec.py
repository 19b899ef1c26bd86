"""Benchmark specs: JSON files in ``specs/`` (ID sets and models, OOD sets, splits, transforms,
cross-domain convention, metric convention), loaded and checked here."""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from pathlib import Path

from ..errors import UvoodError


@dataclass(frozen=True)
class BenchSpec:
    name: str
    version: int
    description: str
    datasets: dict[str, dict]
    models: dict[str, str]
    pairs: list[tuple[str, str]]
    cross_domain: str
    n: int
    quick_n: int
    metric: dict
    groups: list[str]
    deep: bool
    paper_names: dict[str, str] = field(default_factory=dict)
    stand_ins: dict[str, str] = field(default_factory=dict)
    input: tuple[int, int, int] | None = None  # [C, H, W] of a user-supplied model ("module:factory")
    deep_n: int | None = None  # scores that need the model on an evenly spaced subset of this many per set
    quick_deep_n: int | None = None  # the same with --quick
    fit_n: int | None = None  # ID training images the fitted scores see (evenly spaced; None = the whole split)
    quick_fit_n: int | None = None  # the same with --quick
    #: with --quick, ID training images the scores that fit through the model (BatchGrad's anchors, deep low-dim's
    #: subspace) see, at most ``quick_n`` (None: ``quick_n``); without --quick: runner.MODEL_FIT_N
    quick_model_fit_n: int | None = None

    def paper_name(self, name: str) -> str:
        """The paper's name for one of our data sets (e.g. Fashion-MNIST stands in for SVHN)."""
        return self.paper_names.get(name, name)


def available() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("uvood.bench").joinpath("specs").iterdir()
                  if p.name.endswith(".json"))


def _parse(path: Path) -> BenchSpec:
    """The spec in the JSON file ``path``: an object with every field of :class:`BenchSpec` (the
    optional ones may be left out), none other, and only known table groups."""
    from .scoresets import GROUPS

    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UvoodError(f"Benchmark spec {path} is not valid JSON ({e}); fix it (see the specs in "
                         "uvood/bench/specs/ for examples).") from None
    names = {f.name: f for f in fields(BenchSpec)}
    required = {n for n, f in names.items() if f.default is MISSING and f.default_factory is MISSING}
    if not isinstance(raw, dict) or required - set(raw) or set(raw) - set(names):
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise UvoodError(f"Benchmark spec {path} must be a JSON object with the fields {sorted(required)} (optional: "
                         f"{sorted(set(names) - required)}); it has {got}.")
    groups = raw["groups"] if isinstance(raw["groups"], list) else [raw["groups"]]
    unknown = [g for g in groups if not isinstance(g, str) or g not in GROUPS]
    if unknown:
        raise UvoodError(f"Benchmark spec {path}: unknown group(s) {unknown}; choose among {sorted(GROUPS)}.")
    if not isinstance(raw["pairs"], list) or not all(isinstance(p, list) and len(p) == 2 for p in raw["pairs"]):
        raise UvoodError(f"Benchmark spec {path}: 'pairs' must be a list of [ID, OOD] name pairs.")
    return BenchSpec(**{**raw, "pairs": [tuple(p) for p in raw["pairs"]]})


def load_spec(name: str) -> BenchSpec:
    """A named benchmark (``small``, ``large``) or the path of a spec JSON file."""
    path = Path(name)
    if not (path.suffix == ".json" and path.exists()):
        if name not in available():
            raise UvoodError(f"Unknown benchmark {name!r}. Available: {', '.join(available())} "
                             "(or the path of a spec .json file).")
        path = Path(str(resources.files("uvood.bench").joinpath("specs", f"{name}.json")))
    spec = _parse(path)
    for id_name, ood_name in spec.pairs:
        for n in (id_name, ood_name):
            if n not in spec.datasets:
                raise UvoodError(f"Benchmark {spec.name}: pair ({id_name}, {ood_name}) names {n!r}, "
                                 f"which is not in its datasets {sorted(spec.datasets)}.")
        if id_name not in spec.models:
            raise UvoodError(f"Benchmark {spec.name}: ID set {id_name!r} has no model in 'models'.")
    return spec
