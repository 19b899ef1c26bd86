"""Figures of a run as PNG: the ||h||_p x V heatmaps (Figure 2, Appendix C), the V terms on
the 3-class simplex (Figure 1) and ROC curves of the main scores per pair."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..cache import atomic_write  # noqa: E402
from ..scores import output  # noqa: E402
from .runner import RunResult  # noqa: E402
from .scoresets import P_GRID, V_GRID  # noqa: E402
from .tables import heatmap_grid  # noqa: E402

ROC_SCORES = ["msp", "tv", "varsum", "energy", "norm(0.3)*energy", "gradnorm", "exgrad", "gradnorm(depth=deep)",
              "exgrad(depth=deep)"]



def _save(fig, path) -> None:
    """PNG, written atomically (an interrupted run leaves no half figure)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))

def heatmap(grid: np.ndarray, title: str, path: Path) -> None:
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


def roc_curves(result: RunResult, pair: tuple[str, str], path: Path) -> None:
    id_name, ood_name = pair
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for spec in ROC_SCORES:
        key_id, key_ood = (id_name, id_name, spec), (id_name, ood_name, spec)
        if key_id not in result.scores:
            continue
        s_id, s_ood = result.scores[key_id], result.scores[key_ood]
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


def write_all(result: RunResult, out: Path) -> list[str]:
    """Write every figure of the run under ``out``; return their file names."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    if "figure2" in result.spec.groups:
        heatmap(heatmap_grid(result), f"{result.spec.name}: average AUROC of ||h||_p x V over pairs",
                out / "figure2_average.png")
        names.append("figure2_average.png")
        for a, b in result.spec.pairs:
            name = f"heatmap_{a}_vs_{b}.png".replace(" ", "_")
            heatmap(heatmap_grid(result, (a, b)), f"{a} x {b}", out / name)
            names.append(name)
    simplex(out / "figure1_simplex.png")
    names.append("figure1_simplex.png")
    for a, b in result.spec.pairs:
        name = f"roc_{a}_vs_{b}.png".replace(" ", "_")
        roc_curves(result, (a, b), out / name)
        names.append(name)
    return names
