"""Bounded memory: Detector.fit forwards the ID data once, streams DataLoaders like tensors, and .npz members are
read slice by slice (uvood.data.lazy)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import uvood
from uvood.data.lazy import LazyImages, StoredArray, open_npz
from uvood.errors import UvoodError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 12), nn.ReLU(),
                         nn.Linear(12, 3)).eval()


def _data(n=48):
    g = torch.Generator().manual_seed(2)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 3


def test_fit_of_a_fitted_score_forwards_the_id_data_once():
    model, (x, y) = _model(), _data()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    det = uvood.Detector(model, score="mahalanobis", batch_size=8).fit((x, y), progress=False)
    assert sum(seen) <= len(x) + 2  # the data once, plus one-sample probes (class count, head weights)
    # the same threshold as fitting the statistics on extracted features and scoring those features
    f = uvood.extract(model, (x, y), batch_size=8, progress=False)
    ref = uvood.get_score("mahalanobis")
    ref.fit_features(f.h, f.logits, f.y)
    s = ref.from_features(f.h, f.logits)
    assert det.threshold == uvood.metrics.threshold_at_tpr(s, 0.95)
    torch.testing.assert_close(det.score(x, progress=False), s, rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec", ["mahalanobis", "batchgrad", "batchgrad(depth=deep)", "gradnorm(depth=deep)",
                                  "norm(0.3)*energy"])
def test_a_dataloader_fits_and_scores_like_the_tensor(spec):
    model, (x, y) = _model(), _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    a = uvood.Detector(model, score=spec, batch_size=8).fit((x, y), progress=False)
    b = uvood.Detector(model, score=spec, batch_size=8).fit(loader, progress=False)
    assert a.threshold == b.threshold
    for k, v in a.score_fn.state().items():
        torch.testing.assert_close(b.score_fn.state()[k], v, rtol=0, atol=0)
    torch.testing.assert_close(b.score(loader, progress=False), a.score(x, progress=False), rtol=0, atol=0)


def test_batchgrad_anchors_are_those_of_the_score_fitted_on_all_data():
    model, (x, y) = _model(), _data()
    det = uvood.Detector(model, score="batchgrad", batch_size=8).fit(DataLoader(TensorDataset(x, y), batch_size=8),
                                                                       progress=False)
    ref = uvood.get_score("batchgrad")
    ref.fit(model, x, y)
    torch.testing.assert_close(det.score_fn.anchor_x, ref.anchor_x, rtol=0, atol=0)
    torch.testing.assert_close(det.score_fn.anchor_grad, ref.anchor_grad, rtol=1e-6, atol=1e-9)


def test_npz_members_are_read_slice_by_slice(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(50))
    arrays = open_npz(tmp_path / "d.npz")
    assert isinstance(arrays["x"], StoredArray)
    np.testing.assert_array_equal(arrays["x"][7:23], x[7:23])
    np.testing.assert_array_equal(np.asarray(arrays["y"]), np.arange(50))
    lazy = LazyImages(arrays["x"], lambda part: torch.from_numpy(part[:, None].astype(np.float32) / 255))
    got = torch.cat([b for b, _ in uvood.batching.iter_batches(lazy, 16)])
    torch.testing.assert_close(got, torch.from_numpy(x[:, None].astype(np.float32) / 255))
    np.savez_compressed(tmp_path / "c.npz", x=x)
    np.testing.assert_array_equal(open_npz(tmp_path / "c.npz")["x"], x)
    raw = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UvoodError, match="truncated or corrupt"):
        open_npz(tmp_path / "t.npz")


def test_map_batches_collects_rows_of_unknown_count_in_order():
    from uvood.distributed import map_batches

    batches = [torch.full((k, 2), float(i)) for i, k in enumerate([3, 1, 5, 2, 7])]  # no len(): buffers grow
    got = map_batches(lambda x, _y: {"a": x.numpy(), "b": x[:, 0].long().numpy()}, iter(batches), 4, "test")
    np.testing.assert_array_equal(got["a"], torch.cat(batches).numpy())
    np.testing.assert_array_equal(got["b"], torch.cat(batches)[:, 0].long().numpy())
