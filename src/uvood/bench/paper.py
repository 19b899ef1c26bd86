"""The paper's own numbers (``paper_values.csv``, transcribed from its tables and heatmaps),
looked up for the same cell as ours: same score, depth and (mapped) ID/OOD pair."""

from __future__ import annotations

import csv
from functools import cache, lru_cache
from importlib import resources

from ..errors import UvoodError
from ..scores.registry import canonical_spec
from .scoresets import paper_spec


@lru_cache(maxsize=1)
def values() -> list[dict]:
    with resources.files("uvood.bench").joinpath("paper_values.csv").open() as f:
        return list(csv.DictReader(f))


PAPER_BENCH = {"small": "small", "large": "imagenet"}


@cache
def _canon(spec: str, depth: str) -> str:
    """Our canonical spec of a paper row; shallow gradient rows include the head's bias (the authors' code)."""
    try:
        return paper_spec(spec, depth)
    except UvoodError:  # a paper row our registry cannot express: never matches
        return f"<paper:{spec}:{depth}>"


@cache
def _rows_by_spec(bench: str) -> dict[str, list[dict]]:
    """The paper's rows of ``bench`` by our canonical spec, in the file's order."""
    out: dict[str, list[dict]] = {}
    for r in values():
        if r["benchmark"] == bench:
            out.setdefault(_canon(r["spec"], r["depth"]), []).append(r)
    return out


def lookup(benchmark: str, id_name: str, ood_name: str, spec: str, sources: tuple[str, ...] = ()) -> dict | None:
    """The paper's value for (pair, spec) — ``id_name``/``ood_name`` in the paper's names —, or None.

    ``spec`` is a spec with depth (``gradnorm(depth=deep)``), compared in canonical form; ``sources`` restricts
    the table ("Table 2", "Appendix A", ...). ``ood_name == ""`` asks for an average row.
    """
    for r in _rows_by_spec(PAPER_BENCH.get(benchmark, benchmark)).get(canonical_spec(spec), []):
        if sources and r["source"] not in sources:
            continue
        if ood_name == "":  # an average over the benchmark's pairs (Table 1/3 means, Table 2 averages, Figure 2)
            if r["ood"] == "" and r["statistic"] in ("auroc", "auroc_mean") and not r["id"].startswith("std"):
                return r
            continue
        if r["id"] == id_name and r["ood"] == ood_name and r["statistic"] == "auroc":
            return r
    return None


def lookup_std(benchmark: str, spec: str) -> float | None:
    for r in _rows_by_spec(PAPER_BENCH.get(benchmark, benchmark)).get(canonical_spec(spec), []):
        if r["statistic"] == "auroc_std":
            return float(r["value"])
    return None
