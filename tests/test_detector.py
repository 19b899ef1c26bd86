"""The deployable Detector: fit, score, predict, save, load, and its errors."""

import io
import json
import re
import sys

import pytest
import torch
from torch import nn

import uvood
import uvood.progress
from uvood import zoo
from uvood.errors import UvoodError


def _model(c=4):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, c))


def test_fit_keeps_tpr_of_id_and_roundtrips(tmp_path):
    m = _model()
    x = torch.rand(200, 1, 8, 8)
    det = uvood.Detector(m, score="norm(0.3)*energy").fit(x, tpr=0.9)
    flagged = det.predict(x)
    assert flagged.dtype == torch.bool and int(flagged.sum()) == 20  # 200 distinct scores, 90 % kept
    det.save(tmp_path / "det.pt")
    det2 = uvood.Detector.load(tmp_path / "det.pt", m)
    assert det2.threshold == det.threshold and det2.spec == det.spec
    assert torch.equal(det2.predict(x), flagged)


def test_scores_equal_functional_api():
    m = _model()
    x = torch.rand(30, 1, 8, 8)
    det = uvood.Detector(m, score="tv").fit(x)
    f = uvood.extract(m, x, progress=False)
    torch.testing.assert_close(det.score(x), uvood.score_features("tv", f.h, f.logits))


def test_fit_from_dataloader_with_labels():
    m = _model()
    x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 4, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    det = uvood.Detector(m, score="msp").fit(loader)
    assert det.threshold == uvood.Detector(m, score="msp").fit(x).threshold


def test_load_refuses_other_weights_and_other_class_count(tmp_path):
    m = _model()
    det = uvood.Detector(m, score="energy").fit(torch.rand(20, 1, 8, 8))
    det.save(tmp_path / "d.pt")
    other = _model()
    with torch.no_grad():
        other[4].weight.mul_(2)
    with pytest.raises(UvoodError, match="weights differ"):
        uvood.Detector.load(tmp_path / "d.pt", other)
    with pytest.raises(UvoodError, match="classes"), pytest.warns(UserWarning, match="weights differ"):
        uvood.Detector.load(tmp_path / "d.pt", _model(c=5), strict=False)
    (tmp_path / "bad.pt").write_bytes(b"not a detector")
    with pytest.raises(UvoodError, match="not a valid"):
        uvood.Detector.load(tmp_path / "bad.pt", m)


def test_bad_inputs_get_clear_errors():
    m = _model()
    with pytest.raises(UvoodError, match="empty"):
        uvood.Detector(m).fit(torch.zeros(0, 1, 8, 8))
    with pytest.raises(UvoodError, match="NaN"):
        uvood.Detector(m).fit(torch.full((4, 1, 8, 8), float("nan")))
    det = uvood.Detector(m, score="msp").fit(torch.rand(10, 1, 8, 8))
    with pytest.raises(UvoodError, match="channel"):
        det.score(torch.rand(2, 3, 8, 8))
    with pytest.raises(UvoodError, match="4-D"):
        det.score(torch.rand(8, 8))
    with pytest.raises(UvoodError, match="shape"):
        det.score(torch.rand(2, 1, 9, 9))
    with pytest.raises(UvoodError, match="fit"):
        uvood.Detector(m).predict(torch.rand(2, 1, 8, 8))
    with pytest.raises(UvoodError, match="classes"):
        uvood.Detector(m).fit((torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 9])))
    with pytest.raises(UvoodError, match="Unknown score"):
        uvood.Detector(m, score="norm(0.3)*enrgy")
    with pytest.raises(UvoodError, match=r"ONE argument: fit\(\(x, y\)\)"):  # scikit-learn's fit(x, y)
        uvood.Detector(m, score="mahalanobis").fit(torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0]))


# ---------------------------------------------------------------- loading checks: tampered files


def _saved_batchgrad(tmp_path):
    """A fitted shallow-BatchGrad detector (it has state tensors) saved to disk, with its model."""
    m = _model()
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 4
    det = uvood.Detector(m, score="norm(1)*batchgrad").fit((x, y), tpr=0.9)
    det.save(tmp_path / "d.pt")
    return m, tmp_path / "d.pt"


def _tamper(path, edit_meta=None, edit_state=None, reseal=True):
    """Rewrite a saved detector with edited meta / state; ``reseal`` recomputes its checksum as a careful
    forger (or a buggy writer) would, so that only the field checks can catch the edit."""
    payload = torch.load(path, weights_only=True)
    meta, state = json.loads(payload["meta"]), payload["state"]
    if edit_meta:
        edit_meta(meta)
    if edit_state:
        edit_state(state)
    if reseal and "checksum" in meta:
        from uvood.detector import _checksum

        meta["checksum"] = _checksum(meta, state)
    torch.save({"meta": json.dumps(meta), "state": state}, path)


def _set(key, value):
    return lambda meta: meta.__setitem__(key, value)


@pytest.mark.parametrize("edit,msg", [
    (_set("threshold", float("nan")), r"field 'threshold' must be a finite number, got 'nan'"),
    (_set("threshold", float("inf")), r"field 'threshold' must be a finite number"),
    (_set("threshold", "0.5"), r"field 'threshold' must be a finite number, got '0.5'"),
    (_set("threshold", -1e9), r"'threshold' = -1000000000.0 lies outside the range .* of the ID scores"),
    (_set("tpr", 5), r"field 'tpr' must be a number in \(0, 1\], got '5'"),
    (_set("input_shape", "1,8,8"), r"field 'input_shape' must be a list \[C, H, W\] of 3 positive integers"),
    (_set("input_shape", [1, 8]), r"field 'input_shape' must be a list \[C, H, W\]"),
    (_set("batch_size", 0), r"field 'batch_size' must be an integer >= 1, got '0'"),
    (_set("batch_size", -5), r"field 'batch_size' must be an integer >= 1, got '-5'"),
    (_set("batch_size", True), r"field 'batch_size' must be an integer >= 1"),
    (_set("num_classes", "4"), r"field 'num_classes' must be an integer >= 2"),
    (_set("version", 3), r"written by a newer uvood \(detector format version 3; this uvood reads version 2\): "
                         r"upgrade uvood"),
    (_set("version", 1), r"written by an older uvood .* fit the detector again"),
    (_set("version", "2"), r"field 'version' must be an integer >= 1"),
    (_set("format", "other"), r"format 'other' instead of 'uvood-detector'"),
    (_set("spec", "norm(1.0)*batchgrad"), r"spec 'norm\(1.0\)\*batchgrad' is not in the canonical form"),
    (_set("extra", 1), r"unknown field\(s\) \['extra'\]"),
    (lambda meta: meta.pop("tpr"), r"missing field\(s\) \['tpr'\]"),
    (_set("score_version", "norm:1*batchgrad:0"), r"fitted with another version of its code \('norm:1\*batchgrad:0'"),
])
def test_load_refuses_each_tampered_field(tmp_path, edit, msg):
    m, path = _saved_batchgrad(tmp_path)
    _tamper(path, edit_meta=edit)
    with pytest.raises(UvoodError, match=msg):
        uvood.Detector.load(path, m)


def test_load_refuses_meta_that_is_not_an_object(tmp_path):
    m, path = _saved_batchgrad(tmp_path)
    payload = torch.load(path, weights_only=True)
    torch.save({"meta": json.dumps([1, 2, 3]), "state": payload["state"]}, path)
    with pytest.raises(UvoodError, match="its meta is a JSON list, not an object of fields"):
        uvood.Detector.load(path, m)


def _put(key, value):
    return lambda state: state.__setitem__(key, value)


@pytest.mark.parametrize("edit,msg", [
    (_put("1.evil", torch.zeros(3)), r"keeps the fitted tensors \['1.anchor_grad', .* but the file holds .*'1.evil'"),
    (_put("evil", torch.zeros(3)), r"keeps the fitted tensors .* but the file holds .*'evil'"),
    (_put("0.anchor_x", torch.zeros(4, 1, 8, 8)), r"Score 'norm\(1\)' has no fitted state, but the file holds "
                                                   r"\['anchor_x'\]"),
    (_put("1.anchor_x", torch.zeros(4, 1, 9, 9)), r"state tensor '1.anchor_x' has shape \(4, 1, 9, 9\), "
                                                   r"expected \(4, 1, 8, 8\)"),
    (_put("1.anchor_grad", torch.zeros(4, 7, dtype=torch.float64)), r"'1.anchor_grad' has shape \(4, 7\), "
                                                                     r"expected \(4, 144\)"),
    (_put("1.anchor_y", torch.tensor([0, 1, 2, 9])), r"'1.anchor_y' holds labels outside \[0, 4\)"),
    (_put("1.anchor_y", torch.zeros(4)), r"'1.anchor_y' has dtype torch.float32, expected int"),
    (_put("1.anchor_x", torch.full((4, 1, 8, 8), float("nan"))), r"'1.anchor_x' holds NaN or infinite values"),
    (lambda state: state.pop("1.anchor_grad"), r"needs the fitted tensors"),
])
def test_load_refuses_tampered_state(tmp_path, edit, msg):
    m, path = _saved_batchgrad(tmp_path)
    _tamper(path, edit_state=edit)
    with pytest.raises(UvoodError, match=msg):
        uvood.Detector.load(path, m)


@pytest.mark.parametrize("edit", [_set("spec", "energy"), _set("tpr", 0.5), _set("head", "4"),
                                  lambda meta: meta.__setitem__("threshold", sum(meta["id_score_range"]) / 2)])
def test_load_refuses_an_edit_that_breaks_the_checksum(tmp_path, edit):
    m = _model()
    det = uvood.Detector(m, score="norm(0.3)*energy").fit(torch.rand(30, 1, 8, 8))
    det.save(tmp_path / "d.pt")
    _tamper(tmp_path / "d.pt", edit_meta=edit, reseal=False)
    with pytest.raises(UvoodError, match="checksum does not match its content"):
        uvood.Detector.load(tmp_path / "d.pt", m)


def test_load_refuses_a_truncated_file(tmp_path):
    m, path = _saved_batchgrad(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UvoodError, match="cannot be read as a tensors-only torch file"):
        uvood.Detector.load(path, m)
    with pytest.raises(UvoodError, match="No detector file at"):
        uvood.Detector.load(tmp_path / "missing.pt", m)


def test_load_refuses_a_pickled_object(tmp_path):
    m, path = _saved_batchgrad(tmp_path)
    torch.save({"meta": "{}", "state": {}, "evil": nn.ReLU()}, path)  # an arbitrary object: never unpickled
    with pytest.raises(UvoodError, match="cannot be read as a tensors-only torch file"):
        uvood.Detector.load(path, m)


def test_batchgrad_detector_roundtrips(tmp_path):
    m, path = _saved_batchgrad(tmp_path)
    det = uvood.Detector.load(path, m)
    x = torch.rand(10, 1, 8, 8)
    det2 = uvood.Detector(m, score="norm(1)*batchgrad")
    det2.score_fn.load_state(torch.load(path, weights_only=True)["state"])
    torch.testing.assert_close(det.score(x), det2.score(x), rtol=0, atol=0)


def test_strict_false_loads_other_weights_with_a_warning(tmp_path):
    m = _model()
    uvood.Detector(m, score="energy").fit(torch.rand(20, 1, 8, 8)).save(tmp_path / "d.pt")
    other = _model()
    with torch.no_grad():
        other[4].weight.mul_(2)
    with pytest.warns(UserWarning, match=r"weights differ .* Loaded anyway \(strict=False\)"):
        det = uvood.Detector.load(tmp_path / "d.pt", other, strict=False)
    assert det.model is other


def test_load_probes_in_the_models_dtype(tmp_path):
    m = _model().double()
    x = torch.rand(30, 1, 8, 8, dtype=torch.float64)
    det = uvood.Detector(m, score="energy").fit(x)
    det.save(tmp_path / "d.pt")
    det2 = uvood.Detector.load(tmp_path / "d.pt", m)
    assert torch.equal(det2.predict(x), det.predict(x))


def test_threshold_is_the_brute_force_tpr_threshold():
    m = _model()
    x = torch.rand(10, 1, 8, 8)
    tpr = 0.9 + 5e-11  # 9 of 10 is not enough: all 10 must be kept
    det = uvood.Detector(m, score="norm(0.3)*energy").fit(x, tpr=tpr)
    s = det.score(x).numpy()
    assert det.threshold == max(t for t in s if (s >= t).mean() >= tpr) == s.min()
    assert det.threshold == uvood.metrics.threshold_at_tpr(s, tpr)
    assert not det.predict(x).any()


def test_predict_accepts_a_dataloader():
    m = _model()
    x, y = torch.rand(50, 1, 8, 8), torch.arange(50) % 4
    det = uvood.Detector(m, score="norm(0.3)*energy").fit(x)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    assert torch.equal(det.predict(loader), det.predict(x))
    torch.testing.assert_close(det.score(loader), det.score(x), rtol=0, atol=0)
    with pytest.raises(UvoodError, match="The data is empty"):
        det.score(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]), batch_size=4))


def test_batch_size_must_be_a_positive_integer():
    with pytest.raises(UvoodError, match=r"batch_size must be an integer >= 1, got 0"):
        uvood.Detector(_model(), batch_size=0)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_count_images_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(uvood.progress, "DELAY", 0.0)
    m, x = _model(), torch.rand(7, 1, 8, 8)
    for run in (lambda p: uvood.Detector(m, score="energy", batch_size=4).fit(x, progress=p),
                lambda p: uvood.score_model("gradnorm(depth=deep)", m, x, batch_size=4, progress=p),
                lambda p: uvood.extract(m, x, batch_size=4, progress=p)):
        term = _Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        run(True)
        assert re.search(r"\b[0-7]/7 \[", term.getvalue()) and "img" in term.getvalue()  # 7 images, not 2 batches
        run(False)
        not_a_terminal = io.StringIO()
        monkeypatch.setattr(sys, "stderr", not_a_terminal)
        run(True)
        assert not_a_terminal.getvalue() == ""
        term2 = _Terminal()
        monkeypatch.setattr(sys, "stderr", term2)
        run(False)
        assert term2.getvalue() == ""


def test_batchgrad_with_bias_detector_roundtrips(tmp_path):
    """Shallow BatchGrad with bias=true keeps a C x (D + 1) anchor gradient; the file's schema accepts exactly that."""
    model = zoo.load("mnist-mlp")
    x = torch.rand(40, 1, 28, 28)
    y = torch.arange(40) % 10
    det = uvood.Detector(model, score="batchgrad(bias=true)").fit((x, y), progress=False)
    det.save(tmp_path / "d.pt")
    back = uvood.Detector.load(tmp_path / "d.pt", model)
    assert torch.equal(back.score(x[:8], progress=False), det.score(x[:8], progress=False))
