"""Inputs a user actually has: one layout rule, dtypes, empty inputs, input ranges, float64 runs."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import uvood
from uvood.errors import UvoodError
from uvood.validation import RangeWarning, as_images, model_input


def _cnn(channels=1, classes=4):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, classes)).eval()


def _mlp():
    torch.manual_seed(2)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


# ---------------------------------------------------------------- the layout rule


def test_layout_rule_reads_every_common_layout_to_the_same_images():
    g = np.random.default_rng(0)
    nhwc = g.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    expected = torch.from_numpy(nchw).double() / 255
    for x in (nhwc, nchw, torch.from_numpy(nhwc), nchw.astype(np.float32) / 255, nhwc.astype(np.float64) / 255):
        got = as_images(x, dtype=torch.float64)
        assert got.shape == (5, 3, 8, 8)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    grey = g.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    for x in (grey, grey[..., None], grey[:, None]):
        torch.testing.assert_close(as_images(x, dtype=torch.float64), torch.from_numpy(grey[:, None]).double() / 255)
    # with the model's channel count known, an N x H x W x C array whose second axis happens to be 3 is read right
    odd = g.integers(0, 256, (2, 3, 5, 1), dtype=np.uint8)
    torch.testing.assert_close(as_images(odd, channels=1, dtype=torch.float64),
                               torch.from_numpy(odd.transpose(0, 3, 1, 2)).double() / 255)


@pytest.mark.parametrize("shape,match", [((3, 8, 8), "read as 3 greyscale images.*x\\[None\\]"),
                                         ((8, 8), "must be 3-D .* or 4-D"),
                                         ((2, 5, 8, 8), "neither N x 3 x H x W nor N x H x W x 3"),
                                         ((0, 3, 8, 8), "empty")])
def test_layout_rule_refuses_what_it_cannot_read(shape, match):
    with pytest.raises(UvoodError, match=match):
        model_input(torch.rand(*shape), torch.float32, channels=3)


def test_non_image_inputs_pass_as_they_are_and_bad_dtypes_are_refused():
    x = torch.randn(4, 3, 5, dtype=torch.float64)  # a sequence model's input: not reshaped
    got = model_input(x, torch.float32, channels=None)
    assert got.dtype == torch.float32 and got.shape == x.shape
    with pytest.raises(UvoodError, match="must be float .or uint8 images"):
        model_input(torch.ones(4, 3, dtype=torch.int64), torch.float32)


# ---------------------------------------------------------------- entry points agree


def test_uint8_float64_and_channels_last_inputs_score_like_float32_nchw():
    m = _cnn()
    g = np.random.default_rng(1)
    u8 = g.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    ref_x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    ref = uvood.score_model("msp", m, ref_x)
    ref_deep = uvood.score_model("gradnorm(depth=deep)", m, ref_x)
    variants = [u8, u8[..., 0], ref_x.double().numpy(), ref_x.permute(0, 2, 3, 1).contiguous()]
    for x in variants:
        torch.testing.assert_close(uvood.score_model("msp", m, x), ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(uvood.score_model("gradnorm(depth=deep)", m, x), ref_deep, rtol=1e-5, atol=0)
        torch.testing.assert_close(uvood.extract(m, x, progress=False).logits, m(ref_x).detach(), rtol=1e-6, atol=1e-6)
    det = uvood.Detector(m, score="msp").fit(ref_x)
    torch.testing.assert_close(det.score(u8), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(uvood.Detector(m, score="msp").fit(u8).threshold, det.threshold)


def test_missing_batch_axis_is_refused_not_read_as_other_samples():
    m = _cnn(channels=3)
    one = torch.rand(3, 8, 8)
    for call in (lambda: uvood.score_model("msp", m, one), lambda: uvood.extract(m, one, progress=False),
                 lambda: uvood.Detector(m, score="msp").fit(one)):
        with pytest.raises(UvoodError, match=r"add the batch axis \(x\[None\]\)"):
            call()
    torch.testing.assert_close(uvood.score_model("msp", m, one[None]), uvood.score_model("msp", m, one[None].numpy()))
    from uvood import zoo

    mlp = zoo.load("mnist-mlp")  # no convolution: float inputs pass as they are, the output shows the missing axis
    with pytest.raises(UvoodError, match="first axis is not the batch.*add the batch axis"):
        uvood.extract(mlp, torch.rand(28, 28), progress=False)


@pytest.mark.parametrize("entry", ["score_features", "extract", "score_model", "score_model_deep", "fit",
                                   "detector_score", "loader", "engine"])
def test_empty_input_is_a_clear_error_everywhere(entry):
    m = _cnn()
    empty = torch.zeros(0, 1, 8, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(empty), batch_size=4)
    calls = {
        "score_features": lambda: uvood.score_features("norm(0.3)*energy", torch.zeros(0, 8), torch.zeros(0, 4)),
        "extract": lambda: uvood.extract(m, empty, progress=False),
        "score_model": lambda: uvood.score_model("msp", m, empty),
        "score_model_deep": lambda: uvood.score_model("exgrad(depth=deep)", m, empty.numpy()),
        "fit": lambda: uvood.Detector(m).fit(empty),
        "detector_score": lambda: uvood.Detector(m).fit(torch.rand(4, 1, 8, 8)).score(empty),
        "loader": lambda: uvood.score_model("msp", m, loader),
        "engine": lambda: uvood.scores.engine.per_sample_grad_norms(m, empty, lambda z: z[None]),
    }
    with pytest.raises(UvoodError, match="empty"):
        calls[entry]()


# ---------------------------------------------------------------- input range


def test_pixels_in_0_255_warn_once_for_a_model_declaring_its_range():
    m = _mlp()
    m.input_range = (0.0, 1.0)
    x = torch.rand(20, 1, 8, 8) * 255
    for call in (lambda: uvood.score_model("msp", m, x, batch_size=4), lambda: uvood.extract(m, x, batch_size=4,
                                                                                             progress=False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        ranged = [w for w in caught if issubclass(w.category, RangeWarning)]
        assert len(ranged) == 1 and "divide by 255" in str(ranged[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uvood.score_model("msp", m, x / 255, batch_size=4)
        uvood.score_model("msp", _mlp(), x, batch_size=4)  # no declared range: nothing to say


def test_zoo_models_declare_the_unit_range():
    from uvood import zoo

    m = zoo.load("mnist-mlp")
    with pytest.warns(RangeWarning, match=r"takes values in \[0, 1\]"):
        uvood.score_model("msp", m, torch.rand(3, 1, 28, 28) * 255)


# ---------------------------------------------------------------- float64: batch-independent


def test_float64_scores_do_not_depend_on_the_batch():
    """dtype=float64: a sample's deep score is the same alone, in any batch, and equals the float64
    per-sample reference; the float32 model is left as it was."""
    from uvood.scores.reference import reference_grad_score

    m = _cnn()
    x = torch.rand(9, 1, 8, 8)
    perm = torch.randperm(9)
    spec = "exgrad(depth=deep)"
    full = uvood.score_model(spec, m, x, batch_size=9, dtype="float64")
    alone = torch.cat([uvood.score_model(spec, m, x[i:i + 1], dtype=torch.float64) for i in range(9)])
    shuffled = uvood.score_model(spec, m, x[perm], batch_size=4, dtype="float64")
    torch.testing.assert_close(alone, full, rtol=1e-13, atol=0)
    torch.testing.assert_close(shuffled, full[perm], rtol=1e-13, atol=0)
    ref = reference_grad_score(m, x, label="predicted", agg="mean_of_norm", norm="l1", depth="deep")
    torch.testing.assert_close(full, ref, rtol=1e-12, atol=0)
    assert next(m.parameters()).dtype == torch.float32
    det = uvood.Detector(m, score=spec, dtype="float64").fit(x)
    torch.testing.assert_close(det.score(x[perm][:3]), full[perm][:3], rtol=1e-13, atol=0)
    f64 = uvood.extract(m, x, progress=False, dtype="float64")
    assert f64.logits.dtype == torch.float64
    torch.testing.assert_close(f64.logits, m.double()(x.double()).detach(), rtol=1e-13, atol=0)
    with pytest.raises(UvoodError, match="dtype='float16' is not supported"):
        uvood.score_model("msp", m, x, dtype="float16")


# ---------------------------------------------------------------- the command line


def test_cli_score_reads_every_layout_and_dtype(tmp_path, capsys):
    from uvood.cli import main

    g = np.random.default_rng(3)
    u8 = g.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    layouts = {"nhw": u8, "nhwc": u8[..., None], "nchw_float": u8[:, None].astype(np.float32) / 255}
    columns = {}
    for name, x in layouts.items():
        np.savez(tmp_path / f"{name}.npz", x=x)
        out = tmp_path / f"{name}.csv"
        assert main(["score", "--model", "mnist-mlp", "--data", str(tmp_path / f"{name}.npz"), "--score", "msp",
                     "--out", str(out)]) == 0
        columns[name] = [float(r["msp"]) for r in csv.DictReader(open(out))]
    assert len(columns["nhw"]) == 5
    for name in layouts:
        np.testing.assert_allclose(columns[name], columns["nhwc"], rtol=1e-6)
    out = tmp_path / "f64.csv"
    assert main(["score", "--model", "mnist-mlp", "--data", str(tmp_path / "nhw.npz"), "--score", "msp",
                 "--dtype", "float64", "--out", str(out)]) == 0
    np.testing.assert_allclose([float(r["msp"]) for r in csv.DictReader(open(out))], columns["nhw"], rtol=1e-5)
    np.savez(tmp_path / "bad.npz", x=u8.astype(np.float32))  # floats in 0..255
    capsys.readouterr()
    assert main(["score", "--model", "mnist-mlp", "--data", str(tmp_path / "bad.npz"), "--out", str(out)]) == 2
    assert "float images must lie in [0, 1]" in capsys.readouterr().err


def test_cli_score_help_states_the_layout_rule_and_dtype(capsys):
    from uvood.cli import main

    with pytest.raises(SystemExit, match="0"):
        main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "N x H x W (greyscale), N x H x W x C or N x C x H x W" in text
    assert "uint8 (0..255) or float in [0, 1]" in text
    assert "--dtype {float32,float64}" in text


def test_detector_warns_once_per_call_on_pixels_in_0_255():
    m = _cnn()
    m.input_range = (0.0, 1.0)
    det = uvood.Detector(m, score="msp").fit(torch.rand(8, 1, 8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det.score(torch.rand(8, 1, 8, 8) * 255)
    assert [issubclass(w.category, RangeWarning) for w in caught] == [True]
