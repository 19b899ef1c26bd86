"""``uvood demo``: the whole pipeline offline in seconds.

The zoo's MNIST MLP (trained here, committed) scores a bundled sample of real MNIST test
images (ID) and Fashion-MNIST test images (OOD): features -> V-only, ||h|| * V and shallow
gradient scores -> AUROC / FPR95 with bootstrap intervals, then a Detector at 95 % TPR.
"""

from __future__ import annotations

import time

import torch

from . import metrics, zoo
from .data import datasets, transforms
from .detector import Detector
from .features import extract
from .scores.registry import get_score

DEMO_SCORES = [
    ("V only", ["msp", "energy", "tv", "varsum", "maxlogit", "entropy"]),
    ("||h|| * V", ["norm(1)*msp", "norm(1)*energy", "norm(1)*varsum", "norm(0.3)*energy", "norm(inf)*tv"]),
    ("gradient (shallow, closed form)", ["gradnorm", "exgrad", "grad(label=uniform,agg=mean_of_norm,norm=l2sq)"]),
]


def run_demo(verbose: bool = True) -> int:
    t0 = time.time()
    model = zoo.load("mnist-mlp")
    meta = zoo.info("mnist-mlp")
    c, h, _ = meta["input"]
    id_set, ood_set = datasets.sample("mnist"), datasets.sample("fashionmnist")
    x_id = transforms.to_model_format(id_set.x, c, h)
    x_ood = transforms.to_model_format(ood_set.x, c, h)
    f_id = extract(model, x_id, progress=False)
    f_ood = extract(model, x_ood, progress=False)
    acc = float((f_id.logits.argmax(1) == torch.as_tensor(id_set.y)).float().mean())
    print(f"uvood demo: zoo model mnist-mlp (full-test accuracy {100 * meta['test_accuracy']:.2f} %, "
          f"{100 * acc:.1f} % on this sample)")
    print(f"ID = {len(id_set)} bundled MNIST test images, OOD = {len(ood_set)} bundled Fashion-MNIST test images\n")
    print(f"{'group':<34}{'score':<50}{'AUROC':>7}  {'95% CI':<15}{'FPR95':>7}")
    for group, specs in DEMO_SCORES:
        for spec in specs:
            sc = get_score(spec)
            s_id = sc.from_features(f_id.h, f_id.logits).numpy()
            s_ood = sc.from_features(f_ood.h, f_ood.logits).numpy()
            lo, hi = metrics.bootstrap_ci("auroc", s_id, s_ood, n_boot=300, seed=0)
            print(f"{group:<34}{sc.spec:<50}{metrics.auroc(s_id, s_ood):>7.3f}  [{lo:.3f}, {hi:.3f}]  "
                  f"{metrics.fpr95(s_id, s_ood):>7.3f}")
            group = ""
    det = Detector(model, score="norm(0.3)*energy").fit(x_id[::2], tpr=0.95)
    kept = 1 - det.predict(x_id[1::2]).float().mean().item()
    flagged = det.predict(x_ood).float().mean().item()
    print(f"\nDetector(norm(0.3)*energy) fitted on half the ID sample at 95 % TPR: keeps {100 * kept:.1f} % of the "
          f"other half, flags {100 * flagged:.1f} % of the OOD images.")
    print("Higher score = more in-distribution for every score; AUROCs are never flipped. "
          f"Done in {time.time() - t0:.1f} s.")
    return 0
