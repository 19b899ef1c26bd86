"""Tables of a run, as CSV (stable columns) and markdown with the paper's value beside ours.

A markdown cell reads ``ours (paper)``; ``–`` where the paper has no such cell (e.g. a pair
with a far-OOD set it did not use). Pair headers give our pair and, where a data set stands
in for the paper's, the paper's pair.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..cache import atomic_write
from ..scores.registry import canonical_spec
from . import paper
from .runner import COLUMNS, RunResult
from .scoresets import FIGURE2, P_GRID, TABLE1, TABLE2, TABLE3, V_GRID, with_depth


def md_cell(text: str, row: bool = False) -> str:
    """Text safe inside a markdown table cell: a '|' (as in ||h||_1) would otherwise split the cell.
    ``row=True``: a whole table row, whose separators stay and only the norm bars ``||h||`` are escaped."""
    if row:
        return text.replace("||h||", "\\|\\|h\\|\\|")
    return text.replace("|", "\\|")


def _cell(ours: float | None, theirs: float | None) -> str:
    a = "–" if ours is None else f"{ours:.3f}"
    return f"{a} ({theirs:.3f})" if theirs is not None else a


def _index(result: RunResult) -> dict[tuple[str, str, str], dict]:
    return {(r["id"], r["ood"], r["score"]): r for r in result.rows}


def _paper_pair(result: RunResult, id_name: str, ood_name: str) -> tuple[str, str]:
    return result.spec.paper_name(id_name), result.spec.paper_name(ood_name)


def _pair_header(result: RunResult, id_name: str, ood_name: str) -> str:
    pid, pood = _paper_pair(result, id_name, ood_name)
    head = f"{id_name} → {ood_name}"
    in_paper = any(r["id"] == pid and r["ood"] == pood for r in paper.values())
    if not in_paper:
        return head + " (not in the paper)"
    return head + (f" (paper: {pid} → {pood})" if (pid, pood) != (id_name, ood_name) else "")


def write_csv(rows: list[dict], path: Path, columns: list[str] = COLUMNS) -> None:
    """The rows' ``columns`` (default :data:`COLUMNS`) as CSV (floats to 6 decimals), written atomically."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items() if k in columns})
    write_text(path, buf.getvalue())


def write_text(path: Path, text: str) -> None:
    """A text file written atomically (:func:`uvood.cache.atomic_write`): Ctrl-C never leaves half a table."""
    atomic_write(path, lambda f: f.write(text.encode()))


def _paper_value(result, id_name, ood_name, spec, sources=()) -> float | None:
    pid, pood = _paper_pair(result, id_name, ood_name)
    r = paper.lookup(result.spec.name, pid, pood, spec, sources)
    return float(r["value"]) if r else None


def _paper_mean(result, spec, sources=()) -> float | None:
    r = paper.lookup(result.spec.name, "", "", spec, sources)
    return float(r["value"]) if r else None


def per_pair_table(result: RunResult, table: list[tuple[str, str, str]], sources=(), title="") -> tuple[str, list]:
    """Rows = scores, columns = pairs, then mean ± std over pairs (ours (paper))."""
    idx = _index(result)
    pairs = result.spec.pairs
    lines = [f"| score | depth | {' | '.join(_pair_header(result, *p) for p in pairs)} | mean ± std |",
             "|" + "---|" * (len(pairs) + 3)]
    csv_rows = []
    for label, spec, depth in table:
        full = canonical_spec(with_depth(spec, depth))
        cells, vals = [], []
        for p in pairs:
            r = idx.get((p[0], p[1], full))
            if r is not None:
                csv_rows.append(r)
                vals.append(r["auroc"])
            cells.append(_cell(r["auroc"] if r else None, _paper_value(result, p[0], p[1], full, sources)))
        if not vals:
            continue
        pm, ps = _paper_mean(result, full, sources), paper.lookup_std(result.spec.name, full)
        ours = f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.3f}"
        theirs = f" ({pm:.3f} ± {ps:.3f})" if pm is not None and ps is not None else (
            f" ({pm:.3f})" if pm is not None else "")
        lines.append(f"| {md_cell(label)} | {depth if depth != 'none' else 'N/A'} | {' | '.join(cells)} | "
                     f"{ours}{theirs} |")
    return (f"{title}\n\n" if title else "") + "\n".join(lines) + "\n", csv_rows


def table2(result: RunResult) -> tuple[str, list]:
    """Table 2's layout: rows = pairs (and the average), columns = its scores (the weight-only ones last)."""
    idx = _index(result)
    labels = [md_cell(lab) for lab, _, _ in TABLE2]
    lines = ["| ID → OOD | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    csv_rows, per_score = [], {s: [] for _, s, _ in TABLE2}  # keyed by the table's base spec
    for p in result.spec.pairs:
        cells = []
        for _, spec, depth in TABLE2:
            full = canonical_spec(with_depth(spec, depth))
            r = idx.get((p[0], p[1], full))
            if r is not None:
                csv_rows.append(r)
                per_score[spec].append(r["auroc"])
            cells.append(_cell(r["auroc"] if r else None, _paper_value(result, p[0], p[1], full, ("Table 2",))))
        lines.append(f"| {_pair_header(result, *p)} | " + " | ".join(cells) + " |")
    for name, pairs in average_groups(result):
        avg = []
        for _, s, d in TABLE2:
            full = canonical_spec(with_depth(s, d))
            vals = [idx[(a, b, full)]["auroc"] for a, b in pairs if (a, b, full) in idx]
            theirs = _paper_mean(result, with_depth(s, d), ("Table 2",))
            avg.append(_cell(float(np.mean(vals)) if vals else None, theirs))
        lines.append(f"| **{name}** | " + " | ".join(avg) + " |")
    return "\n".join(lines) + "\n", csv_rows


def average_groups(result: RunResult) -> list[tuple[str, list[tuple[str, str]]]]:
    """The pairs each average runs over: all pairs, or one group per ID set when several ID sets stand
    in for the same paper ID set (several models on the same data, e.g. ``large``)."""
    pairs = list(result.spec.pairs)
    ids = list(dict.fromkeys(i for i, _ in pairs))
    if len({result.spec.paper_name(i) for i in ids}) == len(ids):
        return [("average", pairs)]
    return [(f"average, {i}", [p for p in pairs if p[0] == i]) for i in ids]


def heatmap_grid(result: RunResult, pair: tuple[str, str] | None = None, pairs=None) -> np.ndarray:
    """AUROC grid V x p (rows: Energy, TV, MSP, VarSum; columns: P_GRID) for a pair or averaged over
    ``pairs`` (default: all)."""
    idx = _index(result)
    pairs = [pair] if pair else (pairs or result.spec.pairs)
    grid = np.full((len(V_GRID), len(P_GRID)), np.nan)
    for i, v in enumerate(V_GRID):
        for j, p in enumerate(P_GRID):
            vals = [idx[(a, b, f"norm({p})*{v}")]["auroc"] for a, b in pairs if (a, b, f"norm({p})*{v}") in idx]
            if vals:
                grid[i, j] = np.mean(vals)
    return grid


def _grid_lines(result: RunResult, grid: np.ndarray, with_paper: bool) -> list[str]:
    lines = ["| V \\ p | " + " | ".join(P_GRID) + " |", "|" + "---|" * (len(P_GRID) + 1)]
    for i, v in enumerate(V_GRID):
        cells = []
        for j, p in enumerate(P_GRID):
            theirs = _paper_mean(result, f"norm({p})*{v}", ("Figure 2",)) if with_paper else None
            cells.append(_cell(None if np.isnan(grid[i, j]) else float(grid[i, j]), theirs))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def heatmap_table(result: RunResult) -> tuple[str, list]:
    """Figure 2 as a table: average AUROC over pairs per (V, p), with the paper's ImageNet average
    (``large``: one average per model, then every pair's own grid; the paper gives no per-set value
    for our OOD sets)."""
    large = result.spec.name == "large"
    groups = average_groups(result)
    lines = []
    for name, pairs in groups:
        if len(groups) > 1 or large:
            lines += ["", f"**{name[0].upper() + name[1:]} over {len(pairs)} OOD sets**"
                      + (" (paper: average of its 4 ImageNet OOD sets)" if large else ""), ""]
        lines += _grid_lines(result, heatmap_grid(result, pairs=pairs), large)
    if large:
        for pair in result.spec.pairs:
            lines += ["", f"**{pair[0]} → {pair[1]}** (ours only)", ""]
            lines += _grid_lines(result, heatmap_grid(result, pair), False)
    idx = _index(result)
    csv_rows = [idx[k] for k in idx if k[2] in {s for _, s, _ in FIGURE2}]
    return "\n".join(lines).strip("\n") + "\n", csv_rows


BUILDERS = {
    "table1": lambda r: per_pair_table(r, TABLE1, ("Appendix A", "Table 1")),
    "table2": table2,
    "table3": lambda r: per_pair_table(r, TABLE3, ("Appendix A (BatchGrad)", "Table 3")),
    "figure2": heatmap_table,
}


def write_all(result: RunResult, out: Path) -> dict[str, str]:
    """Write every table of the spec's groups as CSV + markdown under ``out``; return the markdown by name."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result.rows, out / "results.csv")
    md = {}
    for name in result.spec.groups:
        if name not in BUILDERS:  # e.g. "claims": its own section of the report (bench/claims.py)
            continue
        md[name], rows = BUILDERS[name](result)
        write_csv(rows, out / f"{name}.csv")
        write_text(out / f"{name}.md", md[name])
    return md
