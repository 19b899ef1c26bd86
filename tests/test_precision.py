"""``--precision bfloat16``: autocast forward passes within a documented tolerance of float32 on a zoo model and
real data; the precision in every cache key; the gradient scores that backpropagate stay float32; refusals."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

import uvood
from uvood import precision
from uvood.cli import main
from uvood.data import transforms
from uvood.errors import UvoodError
from uvood.features import cache_key

#: scores computed from (h, logits): their forward runs in bfloat16 under precision="bfloat16"
FEATURE_SPECS = ["energy", "msp", "maxlogit", "norm(0.3)*energy", "norm(inf)*tv", "exgrad", "gradnorm"]


def _toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 12), nn.ReLU(),
                          nn.Linear(12, 3)).eval()
    return model, torch.rand(24, 1, 8, 8), torch.arange(24) % 3


def test_bfloat16_scores_are_within_the_documented_tolerance_on_a_zoo_model_and_real_data(data_dir):
    model = uvood.zoo.load("mnist-mlp")
    n = 300
    x = {name: transforms.to_model_format(uvood.data.load(name, "test", data_dir=data_dir, limit=n).x, channels=1,
                                          size=28) for name in ("mnist", "fashionmnist")}
    got = {p: {name: uvood.score_model(FEATURE_SPECS, model, xs, progress=False, precision=p)
               for name, xs in x.items()} for p in ("float32", "bfloat16")}
    labels = np.r_[np.ones(n), np.zeros(n)]
    for spec in FEATURE_SPECS:
        a, b = (torch.cat([got[p]["mnist"][spec], got[p]["fashionmnist"][spec]]) for p in ("float32", "bfloat16"))
        assert not torch.equal(a, b), spec  # the forward really ran in bfloat16
        rel = (a - b).abs() / a.abs().clamp_min(1e-12)
        assert float(rel.median()) <= precision.TOLERANCE["median_rel"], spec
        auroc = [roc_auc_score(labels, s.numpy()) for s in (a, b)]
        assert abs(auroc[0] - auroc[1]) <= precision.TOLERANCE["auroc"], spec


def test_scores_that_backpropagate_stay_float32_under_bfloat16():
    model, x, y = _toy()
    for spec in ("gradnorm(depth=deep)", "exgrad(depth=deep)", "odin"):
        want = uvood.score_model(spec, model, x, batch_size=8, progress=False)
        got = uvood.score_model(spec, model, x, batch_size=8, progress=False, precision="bfloat16")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # in a list with feature scores: those run in bfloat16, the deep one is the float32 value
    both = uvood.score_model(["gradnorm(depth=deep)", "energy"], model, x, batch_size=8, progress=False,
                             precision="bfloat16")
    deep32 = uvood.score_model("gradnorm(depth=deep)", model, x, batch_size=8, progress=False)
    torch.testing.assert_close(both["gradnorm(depth=deep)"], deep32, rtol=0, atol=0)
    energy32 = uvood.score_model("energy", model, x, batch_size=8, progress=False)
    assert not torch.equal(both["energy"], energy32)
    torch.testing.assert_close(both["energy"], energy32, rtol=0.05, atol=0.05)


def test_the_precision_enters_the_cache_keys_so_results_never_mix(tmp_path):
    model, x, y = _toy()
    assert cache_key(model, "d", "t") != cache_key(model, "d", "t", precision="bfloat16")
    assert cache_key(model, "d", "t") == cache_key(model, "d", "t", precision="float32")  # old caches stay valid
    f32 = uvood.extract(model, (x, y), batch_size=8, progress=False, cache_dir=tmp_path, data_id="toy")
    bf = uvood.extract(model, (x, y), batch_size=8, progress=False, cache_dir=tmp_path, data_id="toy",
                       precision="bfloat16")
    assert len(list(tmp_path.glob("features-*.npz"))) == 2
    assert not torch.equal(bf.h, f32.h)  # computed, not read from the float32 file
    again = uvood.extract(model, (x, y), batch_size=8, progress=False, cache_dir=tmp_path, data_id="toy")
    torch.testing.assert_close(again.h, f32.h, rtol=0, atol=0)


def test_a_bfloat16_detector_saves_and_loads_its_precision(tmp_path):
    model, x, y = _toy()
    det = uvood.Detector(model, score="mahalanobis", batch_size=8, precision="bfloat16").fit((x, y), progress=False)
    ref = uvood.Detector(model, score="mahalanobis", batch_size=8).fit((x, y), progress=False)
    assert not torch.equal(det.score(x, progress=False), ref.score(x, progress=False))
    det.save(tmp_path / "d.pt")
    ref.save(tmp_path / "r.pt")
    back = uvood.Detector.load(tmp_path / "d.pt", model)
    assert back.precision == "bfloat16"
    torch.testing.assert_close(back.score(x, progress=False), det.score(x, progress=False), rtol=0, atol=0)
    assert uvood.Detector.load(tmp_path / "r.pt", model).precision == "float32"


def test_bfloat16_is_refused_with_the_float64_reference_and_unknown_precisions(tmp_path, capsys):
    model, x, y = _toy()
    with pytest.raises(UvoodError, match="cannot be combined with dtype='float64'"):
        uvood.extract(model, x, progress=False, dtype="float64", precision="bfloat16")
    with pytest.raises(UvoodError, match="cannot be combined with dtype='float64'"):
        uvood.score_model("energy", model, x, progress=False, dtype="float64", precision="bfloat16")
    with pytest.raises(UvoodError, match="cannot be combined with dtype='float64'"):
        uvood.Detector(model, dtype="float64", precision="bfloat16")
    with pytest.raises(UvoodError, match="on a float64 model"):
        uvood.extract(model.double(), x.double(), progress=False, precision="bfloat16")
    # a float32 copy of the float64 model (dtype="float32") may run in bfloat16
    assert len(uvood.extract(model, x, progress=False, dtype="float32", precision="bfloat16")) == len(x)
    with pytest.raises(UvoodError, match="float16 is not offered"):
        uvood.score_model("energy", model.float(), x, progress=False, precision="float16")
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 28, 28), np.uint8))
    assert main(["score", "--model", "mnist-mlp", "--data", str(tmp_path / "d.npz"), "--dtype", "float64",
                 "--precision", "bfloat16", "--out", str(tmp_path / "s.csv")]) == 2
    assert "cannot be combined with dtype='float64'" in capsys.readouterr().err
    assert precision.parse(None) == "float32"  # the command's --precision does not outlive it


def test_uvood_score_precision_bfloat16_writes_scores_near_float32(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (16, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x)
    cols = {}
    for p in ("float32", "bfloat16"):
        assert main(["score", "--model", "mnist-mlp", "--data", str(tmp_path / "d.npz"), "--score", "energy",
                     "--precision", p, "--out", str(tmp_path / f"{p}.csv")]) == 0
        rows = (tmp_path / f"{p}.csv").read_text().splitlines()[1:]
        cols[p] = np.array([float(r.split(",")[-1]) for r in rows])
    assert not np.array_equal(cols["float32"], cols["bfloat16"])
    np.testing.assert_allclose(cols["bfloat16"], cols["float32"], rtol=0.05)


def test_bench_with_bfloat16_keeps_its_own_cache_files_and_float32_deep_rows(tmp_path, data_dir, monkeypatch):
    from test_bench import _mini_spec
    from uvood.bench import runner

    spec = _mini_spec(tmp_path, pairs=[["MNIST", "Fashion-MNIST"]], quick_n=60, quick_deep_n=60)
    computed = []
    compute = uvood.features._compute
    monkeypatch.setattr(uvood.features, "_compute", lambda *a, **k: (computed.append(1), compute(*a, **k))[1])

    def run():
        return runner.run(spec, scores=["energy", "mahalanobis", "gradnorm(depth=deep)"], quick=True,
                          data_dir=data_dir, cache_dir=tmp_path / "c", progress=False, log=lambda *a: 0, n_boot=20)

    f32 = run()
    n_f32 = len(computed)
    precision.use("bfloat16")
    try:
        bf = run()
    finally:
        precision.use(None)
    assert len(computed) == 2 * n_f32  # every feature set extracted again, not read from the float32 files
    assert bf.meta["precision"] == "bfloat16" and f32.meta["precision"] == "float32"
    for key, s in f32.scores.items():
        if key[2] == "gradnorm(depth=deep)":  # backpropagates: float32 under both, read from the cache
            np.testing.assert_array_equal(bf.scores[key], s)
        else:
            assert not np.array_equal(bf.scores[key], s), key
            rel = np.abs(bf.scores[key] - s) / np.maximum(np.abs(s), 1e-12)
            assert np.median(rel) <= precision.TOLERANCE["median_rel"], key
    again = run()  # float32 again: its files are still there
    assert len(computed) == 2 * n_f32
    assert [r["auroc"] for r in again.rows] == [r["auroc"] for r in f32.rows]


def test_zoo_eval_precision_bfloat16_runs_in_bfloat16_and_keeps_the_accuracy(data_dir):
    model = uvood.zoo.load("mnist-mlp")
    out_dtypes = set()
    model.register_forward_hook(lambda m, i, o: out_dtypes.add(o.dtype))
    want = uvood.zoo.evaluate("mnist-mlp", data_dir=data_dir, limit=500, model=model)["accuracy"]
    assert out_dtypes == {torch.float32}
    precision.use("bfloat16")
    try:
        got = uvood.zoo.evaluate("mnist-mlp", data_dir=data_dir, limit=500, model=model)["accuracy"]
    finally:
        precision.use(None)
    assert out_dtypes == {torch.float32, torch.bfloat16}
    assert abs(got - want) <= 0.01


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU here (torch.cuda.is_available() is False): bfloat16 on CUDA is not exercised")
def test_bfloat16_on_cuda_is_within_the_tolerance():
    model, x, _ = _toy()
    want = uvood.score_model(FEATURE_SPECS, model, x, progress=False)
    got = uvood.score_model(FEATURE_SPECS, model.cuda(), x, progress=False, precision="bfloat16")
    for spec in FEATURE_SPECS:
        rel = (got[spec] - want[spec]).abs() / want[spec].abs().clamp_min(1e-12)
        assert float(rel.median()) <= precision.TOLERANCE["median_rel"], spec
