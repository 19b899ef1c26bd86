"""The deployable Detector: fit, score, predict, save, load, and its errors."""

import pytest
import torch
from torch import nn

import uvood
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
    with pytest.raises(UvoodError, match="classes"):
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
