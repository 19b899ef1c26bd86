"""The leaderboard (issue 9): field methods fitted on the ID training split inside the benchmark, ranks and
means recomputed independently (scikit-learn, scipy), not-applicable methods reported with their reason,
and warm reruns that neither read the training images nor fit."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

import uvood
from test_bench import _mini_spec
from uvood.bench import leaderboard, runner
from uvood.bench.report import write_report
from uvood.bench.runner import run
from uvood.bench.scoresets import FIELD
from uvood.scores.registry import canonical_spec

FIELD_SPECS = [canonical_spec(s) for _, s, _ in FIELD]


@pytest.mark.parametrize("values", [[0.9, 0.8, 0.9, 0.5], [0.5] * 4, [0.1, 0.2, 0.3], [0.7]])
def test_ranks_equal_scipy_average_ranks_of_the_negated_values(values):
    assert leaderboard.ranks(values) == list(rankdata(-np.array(values), method="average"))


@pytest.fixture(scope="module")
def lb_run(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("lb")
    spec = _mini_spec(tmp, pairs=[["MNIST", "Fashion-MNIST"], ["MNIST", "CIFAR-10"]], groups=["table2", "leaderboard"],
                      deep=True, quick_n=120, quick_deep_n=20, quick_fit_n=600)
    kw = dict(quick=True, data_dir=data_dir, cache_dir=tmp / "cache", progress=False, log=lambda *a: 0, n_boot=30)
    return spec, kw, run(spec, **kw), tmp


def test_every_field_method_is_fitted_on_the_training_split_and_scored(lb_run, data_dir):
    spec, kw, result, _ = lb_run
    have = {r["score"] for r in result.rows}
    assert set(FIELD_SPECS) <= have and not result.not_applicable
    # the benchmark's Mahalanobis equals one fitted by hand on the same 600 evenly spaced training images
    from uvood import zoo
    from uvood.data import load, to_model_format
    from uvood.model import forward_features
    from uvood.scores import get_score

    model = zoo.load("mnist-mlp")
    train = load("mnist", "train", data_dir=data_dir, limit=600)
    sc = get_score("mahalanobis")
    sc.fit(model, to_model_format(train.x, channels=1, size=28), torch.as_tensor(train.y))
    test = load("mnist", "test", data_dir=data_dir, limit=120)
    with torch.no_grad():
        h, z = forward_features(model, to_model_format(test.x, channels=1, size=28))
    np.testing.assert_allclose(result.scores[("MNIST", "MNIST", "mahalanobis")], sc.from_features(h, z).numpy(),
                               rtol=1e-9)


def test_leaderboard_numbers_are_recomputed_from_the_scores(lb_run):
    spec, _, result, tmp = lb_run
    write_report(result, tmp / "out", "test")
    rows = list(csv.DictReader(open(tmp / "out" / "leaderboard.csv")))
    assert {r["spec"] for r in rows} >= set(FIELD_SPECS) | {"gradnorm(bias=true)", "norm(1)*energy"}
    for pair in spec.pairs:
        mine = [r for r in rows if (r["id"], r["ood"]) == tuple(pair)]
        aurocs = []
        for r in mine:
            s_id, s_ood = result.scores[(pair[0], pair[0], r["spec"])], result.scores[(pair[0], pair[1], r["spec"])]
            want = roc_auc_score(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])
            assert float(r["auroc"]) == pytest.approx(want, abs=1e-6)
            aurocs.append(want)
        np.testing.assert_allclose([float(r["rank"]) for r in mine], rankdata(-np.round(aurocs, 12), method="average"))
    # the table is sorted by mean rank, and the paragraph names the best gradient score's place
    entries = leaderboard.entries(result, [tuple(p) for p in spec.pairs])
    means = [e.mean_rank for e in entries]
    assert means == sorted(means)
    grad = [i for i, e in enumerate(entries, 1) if e.family == "gradient"][0]
    text = leaderboard.paragraph(result, [tuple(p) for p in spec.pairs])
    assert f"The best gradient score, {entries[grad - 1].label}, ranks {grad} of {len(entries)}" in text
    report = (tmp / "out" / "REPORT.md").read_text()
    assert "## Leaderboard" in report and "\\|\\|h\\|\\|_1 Energy" in report  # pipes escaped in table cells


def test_methods_that_cannot_be_fitted_are_reported_not_dropped(tmp_path, data_dir):
    spec = _mini_spec(tmp_path, pairs=[["MNIST", "Fashion-MNIST"]], groups=["leaderboard"], deep=False,
                      quick_n=60, quick_fit_n=8)  # 8 training images: classes missing, fewer than k = 50
    result = run(spec, quick=True, data_dir=data_dir, cache_dir=tmp_path / "c", progress=False, log=lambda *a: 0,
                 n_boot=20)
    na = result.not_applicable
    assert "no samples of class(es)" in na[("MNIST", "mahalanobis")] and ("MNIST", "rmds") in na
    assert "k = 50 but only 8 ID samples" in na[("MNIST", "knn")]
    assert not {r["score"] for r in result.rows} & {s for _, s in na}
    assert {"msp", "fdbd"} <= {r["score"] for r in result.rows}  # the others are there
    lines, _ = leaderboard.section(result)
    assert any(line.startswith("- `mahalanobis` on MNIST: ") and "no samples of class" in line for line in lines)


def test_warm_rerun_neither_reads_training_images_nor_fits(lb_run, monkeypatch):
    spec, kw, first, _ = lb_run

    def refuse(*a, **k):
        raise AssertionError("a warm rerun must only read caches")

    monkeypatch.setattr(runner.uvdata, "load", refuse)
    monkeypatch.setattr(uvood.scores.fitted, "fit_on_features", refuse)
    monkeypatch.setattr(runner, "score_model", refuse)
    second = run(spec, **kw)
    assert [(r["score"], r["auroc"]) for r in first.rows] == [(r["score"], r["auroc"]) for r in second.rows]


def test_two_models_each_fit_their_own_statistics(tmp_path, data_dir):
    """The score objects are shared by the models of a run: each model's fit must be its own (a fitted
    shaping score holds tensors where the gradient scores hold their `bias` flag)."""
    spec = _mini_spec(tmp_path, models={"MNIST": "mnist-mlp", "Fashion-MNIST": "fashionmnist-cnn"},
                      pairs=[["MNIST", "Fashion-MNIST"], ["Fashion-MNIST", "MNIST"]], groups=["leaderboard"],
                      deep=False, quick_n=40, quick_fit_n=300)
    kw = dict(quick=True, data_dir=data_dir, progress=False, log=lambda *a: 0, n_boot=20)
    both = run(spec, cache_dir=tmp_path / "c", **kw)
    alone = run(_mini_spec(tmp_path, models={"Fashion-MNIST": "fashionmnist-cnn"}, pairs=[["Fashion-MNIST", "MNIST"]],
                           groups=["leaderboard"], deep=False, quick_n=40, quick_fit_n=300),
                cache_dir=tmp_path / "c2", **kw)
    for spec_name in ("dice", "knn", "vim", "react"):
        np.testing.assert_array_equal(both.scores[("Fashion-MNIST", "MNIST", spec_name)],
                                      alone.scores[("Fashion-MNIST", "MNIST", spec_name)])
