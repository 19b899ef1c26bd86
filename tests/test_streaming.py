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


def _image_sources(tmp_path, n=21):
    """A folder of PNG files (two classes, images of varying sizes) and a JPEG archive of the same images."""
    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (24 + i % 5, 24 + i % 5, 3), dtype=np.uint8) for i in range(n)]
    for i, im in enumerate(images):
        (tmp_path / "folder" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tmp_path / "folder" / f"c{i % 2}" / f"{i:03d}.png")
    blobs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=90)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    np.savez(tmp_path / "jpeg.npz", data=np.concatenate(blobs), offsets=np.cumsum([0] + [len(b) for b in blobs]),
             y=np.arange(n) % 2, names=np.array([f"img{i}" for i in range(n)]))
    return tmp_path / "folder", tmp_path / "jpeg.npz"


@pytest.mark.parametrize("kind", ["folder", "jpeg"])
def test_uvood_score_decodes_folders_and_jpeg_archives_one_batch_at_a_time(tmp_path, monkeypatch, kind):
    """Counted, not timed: when batch k reaches the model, exactly the images of batches 0..k have been decoded
    (never the whole set); the scores equal those of the images decoded in memory first."""
    from uvood.cli import main
    from uvood.data import formats, transforms

    folder, archive = _image_sources(tmp_path)
    decoded = [0]

    def counted(decode):
        def wrapper(*args):
            decoded[0] += 1
            return decode(*args)
        return wrapper

    if kind == "folder":
        read = formats.read_image_file
        monkeypatch.setattr(formats, "read_image_file", counted(read))
        files, _, _ = formats.list_image_folder(folder)
        everything = [read(f) for f in files]
    else:
        get = formats.JpegArchive.__getitem__
        monkeypatch.setattr(formats.JpegArchive, "__getitem__", counted(get))
        jpegs = formats.JpegArchive(archive, num_classes=2)
        everything = [get(jpegs, i) for i in range(len(jpegs))]
    model = uvood.zoo.load("mnist-mlp")
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((decoded[0], args[0].shape[0])))
    monkeypatch.setattr(uvood.zoo, "load", lambda name, device=None: model)
    out = tmp_path / "s.csv"
    source = folder if kind == "folder" else archive
    assert main(["score", "--model", "mnist-mlp", "--data", str(source), "--score", "energy", "--batch-size", "4",
                 "--out", str(out)]) == 0
    n = len(everything)
    assert [k for _, k in seen] == [4] * (n // 4) + [n % 4]  # one forward per batch
    assert [d for d, _ in seen] == [min(4 * (k + 1), n) for k in range(len(seen))]
    want = uvood.score_model("energy", model, transforms.to_model_format(everything, channels=1, size=28),
                             batch_size=4, progress=False)
    got = [float(r.split(",")[-1]) for r in out.read_text().splitlines()[1:]]
    np.testing.assert_array_equal(np.array(got), want.numpy())


def test_a_sub_range_of_lazy_images_reads_nothing_until_sliced():
    """A rank's share (uvood.distributed slices it with sub) must not read its rows at once: only each batch."""
    reads = []

    class Source:
        def __len__(self):
            return 100

        def __getitem__(self, index):
            reads.append((index.start, index.stop))
            return torch.arange(index.start, index.stop, dtype=torch.float32)

    lazy = LazyImages(Source(), lambda part: part)
    share = lazy.sub(30, 70).sub(5, 1000)  # clipped to its range, as slices are
    assert reads == [] and len(share) == 35
    got = torch.cat([b for b, _ in uvood.batching.iter_batches(share, 16)])
    assert reads == [(35, 51), (51, 67), (67, 70)]
    torch.testing.assert_close(got, torch.arange(35, 70, dtype=torch.float32))
