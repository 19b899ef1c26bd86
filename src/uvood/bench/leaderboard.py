"""The leaderboard (issue 9): the field's post-hoc detectors, the paper's gradient scores and its
U * V products, ranked on every pair of a run, with a paragraph generated from the numbers.

For each group of pairs the report averages over (all pairs; for ``large``, the pairs of one model):

* per pair, the AUROC with its 95 % bootstrap interval and the FPR at 95 % TPR of every method;
* the rank of each method's AUROC on each pair (1 = best; ties share the mean of their ranks),
  and its mean over the pairs: the *mean rank*, by which the table is sorted;
* families: ``field`` (:data:`scoresets.FIELD`: output scores, ODIN, the fitted feature statistics,
  the shaping methods), ``gradient`` (the paper's gradient scores), ``U·V`` (the paper's products).
  The best cell of the ||h||_p · V grid (Figure 2 group) joins as ``U·V, oracle``: it is selected on
  these same pairs, so its rank is optimistic (bench/selection.py gives the honest selection).

A method that cannot be fitted on an ID set's training data is listed under the table with the
reason (:attr:`RunResult.not_applicable`), never dropped silently. Every score is oriented higher =
more ID and every AUROC is as computed: a method below 0.5 ranks low, it is not flipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..scores.registry import canonical_spec
from .runner import RunResult
from .scoresets import FIELD, FIGURE2, LEADERBOARD, LEADERBOARD_EXTRA, with_depth
from .tables import average_groups, md_cell

FAMILIES = ("field", "gradient", "U·V", "U·V, oracle")
CSV_COLUMNS = ["group", "method", "spec", "family", "id", "ood", "auroc", "ci_low", "ci_high", "fpr95", "rank",
               "n_id", "n_ood"]


@dataclass
class Entry:
    label: str
    spec: str
    family: str
    rows: dict  # pair -> result row
    ranks: dict  # pair -> rank among the entries on that pair

    def mean(self, key: str) -> float:
        return float(np.mean([r[key] for r in self.rows.values()]))

    @property
    def mean_rank(self) -> float:
        return float(np.mean(list(self.ranks.values())))


def _family(spec: str, depth: str) -> str:
    if spec in {canonical_spec(s) for _, s, _ in FIELD}:
        return "field"
    return "gradient" if depth != "none" else "U·V"


def ranks(values: list[float]) -> list[float]:
    """Rank of each value, 1 = the largest; tied values share the mean of the ranks they span."""
    v = np.asarray(values, dtype=float)
    return [1.0 + float((v > x).sum()) + (float((v == x).sum()) - 1.0) / 2.0 for x in v]


def entries(result: RunResult, pairs: list[tuple[str, str]]) -> list[Entry]:
    """Every leaderboard method the run has on ``pairs``, with its per-pair rows and ranks, by mean rank."""
    idx = {(r["id"], r["ood"], r["score"]): r for r in result.rows}
    out, seen = [], set()
    for label, spec, depth in LEADERBOARD + LEADERBOARD_EXTRA:
        full = canonical_spec(with_depth(spec, depth))
        rows = {p: idx[(*p, full)] for p in pairs if (*p, full) in idx}
        if rows and full not in seen:
            seen.add(full)
            out.append(Entry(label + (f" ({depth})" if depth != "none" else ""), full, _family(full, depth), rows, {}))
    grid = [(label, canonical_spec(spec)) for label, spec, _ in FIGURE2]
    grid = [(lab, s, {p: idx[(*p, s)] for p in pairs if (*p, s) in idx}) for lab, s in grid]
    grid = [g for g in grid if len(g[2]) == len(pairs)]
    if grid:
        label, spec, rows = max(grid, key=lambda g: np.mean([r["auroc"] for r in g[2].values()]))
        if spec not in seen:
            out.append(Entry(label + " (best grid cell)", spec, "U·V, oracle", rows, {}))
    for p in pairs:
        present = [e for e in out if p in e.rows]
        for e, r in zip(present, ranks([e.rows[p]["auroc"] for e in present])):
            e.ranks[p] = r
    return sorted(out, key=lambda e: (e.mean_rank, -e.mean("auroc")))


def _subset_note(result: RunResult, e: Entry) -> str:
    full_n = {(i, o): (len(result.scores.get((i, i, "msp"), [])), len(result.scores.get((i, o, "msp"), [])))
              for i, o in e.rows}
    return "†" if any((r["n_id"], r["n_ood"]) != full_n[p] for p, r in e.rows.items() if full_n[p][0]) else ""


def table(result: RunResult, pairs: list[tuple[str, str]]) -> tuple[list[str], list[dict]]:
    """Markdown lines and CSV rows of one leaderboard."""
    es = entries(result, pairs)
    head = " | ".join(f"{a} → {b}" for a, b in pairs)
    lines = [f"| # | method | family | mean rank | mean AUROC | mean FPR95 | {head} |",
             "|" + "---|" * (6 + len(pairs))]
    csv_rows = []
    for i, e in enumerate(es, 1):
        cells = []
        for p in pairs:
            r = e.rows.get(p)
            cells.append("–" if r is None else f"{r['auroc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
            if r is not None:
                csv_rows.append({"group": "", "method": e.label, "spec": e.spec, "family": e.family, "id": p[0],
                                 "ood": p[1], "auroc": r["auroc"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                                 "fpr95": r["fpr95"], "rank": e.ranks[p], "n_id": r["n_id"], "n_ood": r["n_ood"]})
        lines.append(f"| {i} | {md_cell(e.label)}{_subset_note(result, e)} | {e.family} | {e.mean_rank:.1f} | "
                     f"{e.mean('auroc'):.3f} | {e.mean('fpr95'):.3f} | " + " | ".join(cells) + " |")
    return lines, csv_rows


def paragraph(result: RunResult, pairs: list[tuple[str, str]]) -> str:
    """What the leaderboard says, generated from its numbers."""
    es = entries(result, pairs)
    if not es:
        return "No leaderboard method was computed on these pairs."
    pos = {e.spec: i for i, e in enumerate(es, 1)}
    by = {f: [e for e in es if e.family == f] for f in FAMILIES}
    top = es[0]
    s = [f"Of {len(es)} methods, the best by mean rank is {top.label} ({top.family}; mean rank {top.mean_rank:.1f}, "
         f"mean AUROC {top.mean('auroc'):.3f})."]
    field = max(by["field"], key=lambda e: e.mean("auroc"), default=None)
    width = float(np.mean([r["ci_high"] - r["ci_low"] for e in es for r in e.rows.values()])) / 2
    for fam, name in (("gradient", "gradient score"), ("U·V", "U·V product (fixed p)"),
                      ("U·V, oracle", "U·V grid cell (selected on these pairs)")):
        if not by[fam]:
            continue
        best = min(by[fam], key=lambda e: pos[e.spec])
        line = (f"The best {name}, {best.label}, ranks {pos[best.spec]} of {len(es)} (mean rank {best.mean_rank:.1f}, "
                f"mean AUROC {best.mean('auroc'):.3f}).")
        if field is not None:
            d = best.mean("auroc") - field.mean("auroc")
            wins = sum(best.rows[p]["auroc"] > field.rows[p]["auroc"] for p in best.rows if p in field.rows)
            both = sum(p in field.rows for p in best.rows)
            verdict = ("beats" if d > 0 else "does not beat") + f" the field's best by mean AUROC, {field.label} " \
                      f"({field.mean('auroc'):.3f}; difference {d:+.3f}, higher on {wins} of {both} pairs)"
            if abs(d) < width:
                verdict += f", a difference smaller than the mean half-width of the pairs' intervals ({width:.3f})"
            line += f" It {verdict}."
        s.append(line)
    return " ".join(s)


def section(result: RunResult) -> tuple[list[str], list[dict]]:
    """The report's leaderboard section (markdown lines) and the CSV rows of ``leaderboard.csv``."""
    splits = {i: f"{ds.get('dataset', i)} `{ds.get('train_split', 'train')}`" for i, ds in result.spec.datasets.items()
              if i in result.spec.models}
    n_fit = f"{result.meta['fit_n']} evenly spaced images of it" if result.meta.get("fit_n") else "all of it"
    L = ["Every method of the field (issue 9; docs/field_detectors.md) at its paper's default setting, fitted "
         f"where it needs fitting on the ID set's training split ({n_fit}: "
         + ", ".join(f"{i}: {s}" for i, s in splits.items())
         + "), beside the paper's gradient scores and U · V products. Cells: AUROC [95 % bootstrap interval]; "
         "rank 1 = best AUROC on a pair; sorted by mean rank. † = computed on the evenly spaced subset of the "
         "scores that need the model (see the rows' `n_id`, `n_ood` in `leaderboard.csv`)."]
    csv_rows = []
    for name, pairs in average_groups(result):
        lines, rows = table(result, pairs)
        for r in rows:
            r["group"] = name
        csv_rows += rows
        L += ["", f"**{name[0].upper() + name[1:]}** ({len(pairs)} pairs)", "", paragraph(result, pairs), ""] + lines
    na = sorted({(i, s, why) for (i, s), why in result.not_applicable.items()})
    if na:
        L += ["", "Not applicable (no rows; the method cannot be fitted on that ID set's training data):", ""]
        L += [f"- `{s}` on {i}: {why}" for i, s, why in na]
    return L, csv_rows
