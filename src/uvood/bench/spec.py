"""Benchmark specs: JSON files in ``specs/`` (ID sets and models, OOD sets, splits, transforms,
cross-domain convention, metric convention), loaded and checked here."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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

    def paper_name(self, name: str) -> str:
        """The paper's name for one of our data sets (e.g. Fashion-MNIST stands in for SVHN)."""
        return self.paper_names.get(name, name)


def available() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("uvood.bench").joinpath("specs").iterdir()
                  if p.name.endswith(".json"))


def load_spec(name: str) -> BenchSpec:
    """A named benchmark (``small``, ``large``) or the path of a spec JSON file."""
    path = Path(name)
    if not (path.suffix == ".json" and path.exists()):
        if name not in available():
            raise UvoodError(f"Unknown benchmark {name!r}. Available: {', '.join(available())} "
                             "(or the path of a spec .json file).")
        path = Path(str(resources.files("uvood.bench").joinpath("specs", f"{name}.json")))
    raw = json.loads(path.read_text())
    spec = BenchSpec(**{**raw, "pairs": [tuple(p) for p in raw["pairs"]]})
    for id_name, ood_name in spec.pairs:
        for n in (id_name, ood_name):
            if n not in spec.datasets:
                raise UvoodError(f"Benchmark {spec.name}: pair ({id_name}, {ood_name}) names {n!r}, "
                                 f"which is not in its datasets {sorted(spec.datasets)}.")
        if id_name not in spec.models:
            raise UvoodError(f"Benchmark {spec.name}: ID set {id_name!r} has no model in 'models'.")
    return spec
