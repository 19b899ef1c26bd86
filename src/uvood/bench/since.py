"""The "Gradients since the paper" table: the gradient methods published since the paper
(:mod:`uvood.scores.since`), each beside its head closed form written as U * V, with GradNorm and
ExGrad for reference, and one generated sentence per method answering the paper's question again:
does the U * V form rank inputs like the full method (its AUROC inside the full method's CI)?

``SINCE`` is a score group in the format of :mod:`uvood.bench.scoresets` ((label, spec, depth) rows);
:func:`section` turns a :class:`~uvood.bench.runner.RunResult` holding those rows into markdown.
"""

from __future__ import annotations

import re

import numpy as np

from ..scores.registry import canonical_spec
from .scoresets import SINCE, with_depth
from .tables import md_cell

#: (method, its full spec(s) in the order preferred, its U * V spec or None, why there is none)
COMPARISONS = [
    ("GAIA-A", ("gaia",), "gaia_v", None),
    ("GAIA-Z", ("gaia(variant=z)",), None,
     "at the head the gradient of the max logit is the head's row W_yhat, whose zero share is a property of the "
     "weights (0 for almost every head): the head form is a constant"),
    ("GradOrth", ("gradorth",), "gradorth_u*gradorth_v", None),
    ("Low-dimensional gradients", ("lowdim(depth=deep)", "lowdim"), None,
     "its features p^T M_j h are bilinear forms with matrices M_j of rank > 1, not a product U(h) V(p)"),
    ("Fisher trace", ("fisher(depth=deep)", "fisher"), "sqnorm*fisher_v", None),
]

_NORM_V = re.compile(r"^norm\([^)]*\)\*(energy|tv|msp|varsum)$")


def _full(spec: str, depth: str) -> str:
    return canonical_spec(with_depth(spec, depth))


def _pairs(result) -> list[tuple[str, str]]:
    return [tuple(p) for p in result.spec.pairs]


def _index(result) -> dict[tuple[str, str, str], dict]:
    return {(r["id"], r["ood"], r["score"]): r for r in result.rows}


def _mean(idx, pairs, spec) -> float | None:
    vals = [idx[(i, o, spec)]["auroc"] for i, o in pairs if (i, o, spec) in idx]
    return float(np.mean(vals)) if len(vals) == len(pairs) and vals else None


def _best_norm_v(result, idx, pairs) -> tuple[str, str] | None:
    """The ||h||_p · V product with the best mean AUROC among the run's rows, if the run has any."""
    specs = {r["score"]: r.get("label", r["score"]) for r in result.rows if _NORM_V.match(r["score"])}
    scored = [(m, s) for s in specs if (m := _mean(idx, pairs, s)) is not None]
    if not scored:
        return None
    best = max(scored)[1]
    return f"best ||h||_p · V: {specs[best]}", best


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    return f"{row['auroc']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def sentence(result, method: str, fulls: tuple[str, ...], uv: str | None, why: str | None) -> str:
    """Does the U * V form match the full method within its CI? One sentence, from the run's rows."""
    idx, pairs = _index(result), _pairs(result)
    full = next((f for f in fulls if any((i, o, f) in idx for i, o in pairs)), None)
    if full is None:
        return f"- **{method}**: not in this run."
    if uv is None:
        return f"- **{method}** (`{full}`): no U·V form — {why}."
    both = [(idx[(i, o, full)], idx[(i, o, uv)]) for i, o in pairs if (i, o, full) in idx and (i, o, uv) in idx]
    if not both:
        return f"- **{method}** (`{full}`): its U·V form `{uv}` is not in this run."
    inside = sum(f["ci_low"] <= u["auroc"] <= f["ci_high"] for f, u in both)
    mf = float(np.mean([f["auroc"] for f, _ in both]))
    mu = float(np.mean([u["auroc"] for _, u in both]))
    verdict = ("yes: the U·V form matches the full method within its CI on every pair" if inside == len(both) else
               "no: the U·V form leaves the full method's CI on some pairs" if inside else
               "no: the U·V form lies outside the full method's CI on every pair")
    return (f"- **{method}** (`{full}` vs `{uv}`): {verdict} ({inside} of {len(both)} pairs inside; "
            f"mean AUROC {mf:.3f} full vs {mu:.3f} U·V).")


def section(result) -> list[str]:
    """Markdown lines: the "Gradients since the paper" table (AUROC [95% CI] of every SINCE row present in
    ``result.rows``, on every pair, and the best ||h||_p · V of the run where it has such rows), then one
    generated sentence per method."""
    idx, pairs = _index(result), _pairs(result)
    rows = [(label + ("" if depth == "none" else f" ({depth})"), _full(spec, depth)) for label, spec, depth in SINCE]
    best = _best_norm_v(result, idx, pairs)
    if best:
        rows.append(best)
    rows = [(label, spec) for label, spec in rows if any((i, o, spec) in idx for i, o in pairs)]
    out = ["## Gradients since the paper", "",
           "AUROC [95% bootstrap CI] per pair; every score higher = more ID. Methods: GAIA-A/Z (Chen et al. 2023), "
           "GradOrth (Behpour et al. 2023), low-dimensional gradients (Wu et al. 2023), the Fisher-information "
           "trace; each beside its head closed form U·V (docs/gradient_scores.md, \"Gradient methods since the "
           "paper\"). Deep rows are computed on the run's deep subset (their n in results.csv).", ""]
    if not rows:
        return out + ["No row of this group is in the run.", ""]
    out.append("| score | spec | " + " | ".join(f"{i} → {o}" for i, o in pairs) + " | mean |")
    out.append("|---|---|" + "---|" * (len(pairs) + 1))
    for label, spec in rows:
        mean = _mean(idx, pairs, spec)
        cells = [_cell(idx.get((i, o, spec))) for i, o in pairs]
        mean_cell = "–" if mean is None else f"{mean:.3f}"
        out.append(f"| {md_cell(label)} | `{spec}` | " + " | ".join(cells) + f" | {mean_cell} |")
    out += ["", "Does each method's U·V form rank inputs like the full method?", ""]
    out += [sentence(result, *c) for c in COMPARISONS]
    return out + [""]
