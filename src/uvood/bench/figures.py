"""Figures of a run as PNG: the ||h||_p x V heatmaps (Figure 2, Appendix C), the V terms on
the 3-class simplex (Figure 1) and ROC curves of the main scores per pair."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..cache import atomic_write
from ..scores import output
from .runner import RunResult
from .scoresets import P_GRID, V_GRID
from .tables import heatmap_grid

FIGURES_VERSION = 1
"""Bump when a figure's drawing code changes: every figure is then redrawn on the next run."""
MEMO = "figures.json"
"""Beside the PNGs: each figure's name -> the digest of what it was drawn from. A rerun whose inputs are
unchanged keeps the PNG instead of drawing it again (drawing is most of a warm rerun's time)."""

ROC_SCORES = ["msp", "tv", "varsum", "energy", "norm(0.3)*energy", "gradnorm", "exgrad", "gradnorm(depth=deep)",
              "exgrad(depth=deep)"]



def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported on first use (a warm rerun that
    draws nothing never pays for the import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    """PNG, written atomically (an interrupted run leaves no half figure)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))

def heatmap(grid: np.ndarray, title: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    im = ax.imshow(grid, cmap="viridis", vmin=np.nanmin(grid), vmax=np.nanmax(grid), aspect="auto")
    ax.set_xticks(range(len(P_GRID)), P_GRID)
    ax.set_yticks(range(len(V_GRID)), [v if v != "tv" else "TV" for v in V_GRID])
    ax.set_xlabel("p of ||h||_p")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < np.nanmean(grid) else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="AUROC")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def simplex(path: Path, resolution: int = 160) -> None:
    """Figure 1: ExGrad's V (sum p(1-p)), MSP and GradNorm's V (TV) over the 3-class simplex."""
    a, b = np.meshgrid(np.linspace(0, 1, resolution), np.linspace(0, 1, resolution))
    inside = a + b <= 1
    p = np.stack([a, b, 1 - a - b], -1)[inside]
    logits = torch.tensor(np.log(np.clip(p, 1e-12, None)))
    terms = [("ExGrad V: sum p(1-p)", 1 - output.varsum(logits).numpy()), ("MSP", output.msp(logits).numpy()),
             ("GradNorm V: TV to uniform", output.tv(logits).numpy())]
    corners = np.array([[0, 0], [1, 0], [0.5, np.sqrt(3) / 2]])
    xy = p @ corners
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, (name, v) in zip(axes, terms):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=2, cmap="Blues")
        ax.plot(*np.r_[corners, corners[:1]].T, color="k", lw=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_aspect("equal")
        ax.axis("off")
        fig.colorbar(sc, ax=ax, shrink=0.7)
    fig.suptitle("Figure 1: output terms on the 3-class probability simplex (vertices: p = one-hot)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def roc_inputs(result: RunResult, pair: tuple[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The ID and OOD scores of each of :data:`ROC_SCORES` the run has for ``pair``."""
    id_name, ood_name = pair
    return {spec: (result.scores[(id_name, id_name, spec)], result.scores[(id_name, ood_name, spec)])
            for spec in ROC_SCORES if (id_name, id_name, spec) in result.scores}


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], pair: tuple[str, str], path: Path) -> None:
    id_name, ood_name = pair
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for spec, (s_id, s_ood) in curves.items():
        thr = np.unique(np.r_[s_id, s_ood])[::-1]
        tpr = np.r_[0, [(s_id >= t).mean() for t in thr[:: max(1, len(thr) // 400)]], 1]
        fpr = np.r_[0, [(s_ood >= t).mean() for t in thr[:: max(1, len(thr) // 400)]], 1]
        ax.plot(fpr, tpr, lw=1.2, label=spec)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("FPR (OOD accepted as ID)")
    ax.set_ylabel("TPR (ID kept)")
    ax.set_title(f"ROC: {id_name} (ID) vs {ood_name} (OOD)", fontsize=10)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _digest(*parts) -> str:
    """sha256 over the figure code's version and everything a figure is drawn from (arrays by bytes)."""
    d = hashlib.sha256(str(FIGURES_VERSION).encode())
    for part in parts:
        if isinstance(part, dict):
            for k in sorted(part):
                d.update(str(k).encode())
                d.update(_digest(part[k]).encode())
        elif isinstance(part, (tuple, list)):
            for x in part:
                d.update(_digest(x).encode())
        elif isinstance(part, np.ndarray):
            a = np.ascontiguousarray(part)
            d.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
        else:
            d.update(repr(part).encode())
    return d.hexdigest()


def _plan(result: RunResult, out: Path) -> list[tuple[str, str, Callable[[Path], None]]]:
    """Every figure of the run: (file name, digest of its inputs, how to draw it)."""
    plan = []
    if "figure2" in result.spec.groups:
        title = f"{result.spec.name}: average AUROC of ||h||_p x V over pairs"
        grids = [("figure2_average.png", heatmap_grid(result), title)]
        grids += [(f"heatmap_{a}_vs_{b}.png".replace(" ", "_"), heatmap_grid(result, (a, b)), f"{a} x {b}")
                  for a, b in result.spec.pairs]
        for name, grid, title in grids:
            if np.isfinite(grid).any():  # a run without the grid's scores (--scores) has nothing to draw there
                plan.append((name, _digest("heatmap", grid, title),
                             lambda path, grid=grid, title=title: heatmap(grid, title, path)))
    plan.append(("figure1_simplex.png", _digest("simplex", 160), simplex))
    for a, b in result.spec.pairs:
        curves = roc_inputs(result, (a, b))
        plan.append((f"roc_{a}_vs_{b}.png".replace(" ", "_"), _digest("roc", (a, b), curves),
                     lambda path, curves=curves, pair=(a, b): roc_curves(curves, pair, path)))
    return plan


def _read_memo(out: Path) -> dict[str, str]:
    try:
        memo = json.loads((out / MEMO).read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}  # no memo, or an unreadable one: every figure is drawn again


def write_all(result: RunResult, out: Path) -> list[str]:
    """Write every figure of the run under ``out``; return their file names. A figure whose PNG exists
    and whose inputs have the digest recorded in ``figures.json`` is kept as it is."""
    out.mkdir(parents=True, exist_ok=True)
    memo, names = _read_memo(out), []
    for name, digest, draw in _plan(result, out):
        if memo.get(name) != digest or not (out / name).is_file():
            memo.pop(name, None)
            draw(out / name)
            memo[name] = digest
        names.append(name)
    memo = {k: memo[k] for k in names}
    atomic_write(out / MEMO, lambda f: f.write(json.dumps(memo, indent=1, sort_keys=True).encode()))
    return names
