"""Feature extraction and its cache: keyed, atomic, verified."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import uvood
from uvood.errors import UvoodError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def test_extract_matches_forward_and_keeps_labels():
    m, x, y = _model(), torch.rand(37, 1, 4, 4), torch.randint(0, 3, (37,))
    f = uvood.extract(m, (x, y), batch_size=10, progress=False)
    assert f.h.shape == (37, 8) and f.logits.shape == (37, 3) and torch.equal(f.y, y)
    torch.testing.assert_close(f.logits, m(x))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    f2 = uvood.extract(m, loader, progress=False)
    torch.testing.assert_close(f2.logits, f.logits)


def test_cache_hit_stale_and_corrupt(tmp_path):
    m, x = _model(), torch.rand(20, 1, 4, 4)
    f1 = uvood.extract(m, x, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("features-*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    f2 = uvood.extract(m, x, cache_dir=tmp_path, progress=False)
    assert torch.equal(f1.h, f2.h)
    # another model (other weights) gets another key, never the stale file
    m2 = _model()
    with torch.no_grad():
        m2[1].weight.add_(1.0)
    f3 = uvood.extract(m2, x, cache_dir=tmp_path, progress=False)
    assert not torch.equal(f3.h, f1.h) and len(list(tmp_path.glob("features-*.npz"))) == 2
    # a corrupt file is reported and recomputed
    files[0].write_bytes(files[0].read_bytes()[:100])
    with pytest.warns(UserWarning, match="corrupt"):
        f4 = uvood.extract(m, x, cache_dir=tmp_path, progress=False)
    assert torch.equal(f4.h, f1.h)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uvood.extract(m, x, cache_dir=tmp_path, progress=False)  # rewritten and valid again


def test_tampered_cache_content_is_detected(tmp_path):
    m, x = _model(), torch.rand(10, 1, 4, 4)
    uvood.extract(m, x, cache_dir=tmp_path, progress=False)
    path = next(tmp_path.glob("features-*.npz"))
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["logits"] = arrays["logits"] + 1
    np.savez(path, **arrays)
    with pytest.warns(UserWarning, match="checksum"):
        f = uvood.extract(m, x, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(f.logits, m(x))


def test_bad_inputs():
    m = _model()
    with pytest.raises(UvoodError, match="NaN"):
        uvood.extract(m, torch.full((3, 1, 4, 4), float("nan")), progress=False)
    with pytest.raises(UvoodError, match="empty"):
        uvood.extract(m, torch.zeros(0, 1, 4, 4), progress=False)
    with pytest.raises(UvoodError, match="must be float .or uint8 images"):
        uvood.extract(m, torch.zeros(2, 1, 4, 4, dtype=torch.int64), progress=False)
    loader = torch.utils.data.DataLoader(torch.rand(4, 1, 4, 4), batch_size=2)
    with pytest.raises(UvoodError, match="data_id"):
        uvood.extract(m, loader, cache_dir="unused", progress=False)


def test_lazy_data_is_only_loaded_on_a_cache_miss(tmp_path):
    m, x, y = _model(), torch.rand(12, 1, 4, 4), torch.randint(0, 3, (12,))
    calls = []

    def load():
        calls.append(1)
        return x, y

    f1 = uvood.extract(m, load, cache_dir=tmp_path, data_id="twelve", progress=False)
    f2 = uvood.extract(m, load, cache_dir=tmp_path, data_id="twelve", progress=False)
    assert calls == [1] and torch.equal(f1.h, f2.h) and torch.equal(f2.y, y)
    torch.testing.assert_close(f1.logits, m(x))
    with pytest.raises(UvoodError, match="needs cache_dir and data_id"):
        uvood.extract(m, load, cache_dir=tmp_path, progress=False)


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    from uvood.cache import atomic_write

    path = tmp_path / "sub" / "file.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def crash(f):
        f.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(path, crash)
    assert path.read_bytes() == b"old" and [p.name for p in path.parent.iterdir()] == ["file.bin"]
