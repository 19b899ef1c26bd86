"""Data layer: named data sets on the real files (skipped without them) and clear errors on
bad files, each written here in exactly the official format."""

import gzip
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import require_data_file
from uvood.data import datasets, formats, load, sample
from uvood.errors import UvoodError

rng = np.random.default_rng(0)


def need(folder, name):
    require_data_file(folder, name)  # skips without UVOOD_DATA, fails when UVOOD_DATA lacks the file


def write_npz(path, **arrays):
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def small_mnist(n=20):
    return {"x": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), "y": rng.integers(0, 10, n).astype(np.int64)}


def jpeg_npz(path, images, y):
    blobs = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=75)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    names = np.array([f"img_{i}.jpg" for i in range(len(images))])
    return write_npz(path, data=np.concatenate(blobs), offsets=offsets, y=np.asarray(y, np.int64), names=names)


# ------------------------------------------------------------------ real files


def test_mnist_test_loads_verified_with_identity(data_dir):
    images = load("mnist", "test", data_dir=data_dir)
    assert images.x.shape == (10000, 28, 28, 1) and images.x.dtype == np.uint8
    assert images.y.dtype == np.int64 and images.num_classes == 10
    assert images.identity == "mnist/test/6039069bcb922bca/all"
    assert images.sha256 == datasets.DATASETS["mnist"].sha256["test"]


def test_sha256_is_computed_once_per_process(data_dir, monkeypatch):
    load("mnist", "test", data_dir=data_dir)
    calls = []
    monkeypatch.setattr(datasets.hashlib, "sha256", lambda *a: calls.append(1))
    load("mnist", "test", data_dir=data_dir)  # cached by (path, size, mtime): no rehash
    assert calls == []


def test_limit_is_an_evenly_spaced_class_balanced_subset(data_dir):
    need(data_dir, "cifar10jpg_test_jpeg.npz")
    images = load("cifar10", "test", data_dir=data_dir, limit=2000)
    assert images.x.shape == (2000, 32, 32, 3)
    assert np.bincount(images.y, minlength=10).tolist() == [200] * 10  # file is class-major
    assert images.identity.endswith("/limit=2000") and images.display == "CIFAR-10 (JPEG copy)"


def test_tinyimagenet_test_is_unlabelled_and_textures_variable_size(data_dir):
    need(data_dir, "tinyimagenet_test_jpeg.npz")
    need(data_dir, "textures10_all_jpeg.npz")
    test = load("tinyimagenet", "test", data_dir=data_dir, limit=10)
    assert (test.y == -1).all() and test.x.shape == (10, 64, 64, 3)
    lazy = load("textures", "all", data_dir=data_dir)
    assert len(lazy) == 1200 and lazy.classes[0] == "banded" and lazy.x[0].ndim == 3
    resized = load("textures", "all", data_dir=data_dir, limit=3, size=32)
    assert resized.x.shape == (3, 32, 32, 3) and "size=32" in resized.identity


def test_bundled_sample_needs_no_data_folder(monkeypatch):
    monkeypatch.delenv("UVOOD_DATA", raising=False)
    for name in ("mnist", "fashionmnist"):
        images = sample(name)
        assert images.x.shape == (300, 28, 28, 1) and len(set(images.y.tolist())) == 10
    assert datasets.SAMPLES.stat().st_size < 1_000_000


# ------------------------------------------------------------------ bad data, clear errors


def test_no_data_folder_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("UVOOD_DATA", raising=False)
    with pytest.raises(UvoodError, match="UVOOD_DATA"):
        load("mnist", "test")


def test_missing_file_names_expected_path_and_how_to_get_it(tmp_path):
    with pytest.raises(UvoodError, match="MNIST test file not found") as err:
        load("mnist", "test", data_dir=tmp_path)
    assert str(tmp_path / "mnist_test.npz") in str(err.value) and "UVOOD_DATA" in str(err.value)
    with pytest.raises(UvoodError, match="uvood data download svhn"):
        load("svhn", "train", data_dir=tmp_path)


def test_imagenet_photos_missing_or_failing_their_checksum(tmp_path):
    with pytest.raises(UvoodError, match="ImageNet-1k photos sample file not found: expected .*imagenet1k_sample_jpeg"):
        load("imagenet1k", "sample", data_dir=tmp_path)
    images = np.repeat(rng.integers(0, 256, (3, 1, 256, 3), dtype=np.uint8), 256, axis=1)  # 256 px as the real
    jpeg_npz(tmp_path / "imagenet1k_photos750_jpeg.npz", images, [1, 999, 7])  # right format, other bytes
    with pytest.raises(UvoodError, match="sha256 .* expected 52fd34ba1e178882.*Replace it with the original"):
        load("imagenet1k", "photos750", data_dir=tmp_path)
    unverified = load("imagenet1k", "photos750", data_dir=tmp_path, verify=False)
    assert unverified.y.tolist() == [1, 999, 7] and unverified.num_classes == 1000
    assert unverified.x.shape == (3, 256, 256, 3)


def test_imagenet_sets_need_a_1000_class_model():
    datasets.check_model_classes("imagenet1k", 1000, "efficientnet-lite2")  # fine
    datasets.check_model_classes("mnist", 10, "mnist-mlp")  # not an ImageNet set: no rule
    with pytest.raises(UvoodError, match="needs an ImageNet-1k classifier \\(1,000 outputs\\), but mnist-mlp has 10"):
        datasets.check_model_classes("imagenet1k", 10, "mnist-mlp")


def test_imagenet_photos_real_files(data_dir):
    need(data_dir, "imagenet1k_sample_jpeg.npz")
    need(data_dir, "imagenet1k_photos750_jpeg.npz")
    sample_ = load("imagenet1k", "sample", data_dir=data_dir)
    assert sample_.x.shape == (1000, 256, 256, 3) and sorted(sample_.y.tolist()) == list(range(1000))
    assert sample_.identity == "imagenet1k/sample/079b807e6c8b6fa9/all"
    fit = load("imagenet1k", "photos750", data_dir=data_dir, limit=10)
    full_y = load("imagenet1k", "photos750", data_dir=data_dir).y
    assert fit.x.shape == (10, 256, 256, 3) and len(np.unique(full_y)) == 150
    assert np.bincount(full_y, minlength=1000).max() == 5


def test_wrong_checksum(tmp_path):
    write_npz(tmp_path / "mnist_test.npz", **small_mnist())
    with pytest.raises(UvoodError, match="sha256 .* expected 6039069bcb922bca"):
        load("mnist", "test", data_dir=tmp_path)


def test_truncated_npz(tmp_path):
    path = write_npz(tmp_path / "mnist_test.npz", **small_mnist(200))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UvoodError, match="truncated or corrupt"):
        load("mnist", "test", data_dir=tmp_path, verify=False)
    with pytest.raises(UvoodError, match="sha256"):  # with verification the checksum catches it first
        load("mnist", "test", data_dir=tmp_path)


def test_wrong_keys(tmp_path):
    path = write_npz(tmp_path / "a.npz", images=np.zeros((2, 28, 28, 1), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(UvoodError, match=r"lacks the keys \['x', 'y'\]"):
        formats.read_decoded_npz(path, 10, (28, 28, 1))


def test_labels_out_of_range(tmp_path):
    arrays = small_mnist()
    arrays["y"][3] = 10
    path = write_npz(tmp_path / "a.npz", **arrays)
    with pytest.raises(UvoodError, match=r"label 10 at index 3 is out of range \[0, 9\]"):
        formats.read_decoded_npz(path, 10, (28, 28, 1))


def test_wrong_image_shape(tmp_path):
    path = write_npz(tmp_path / "a.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(UvoodError, match=r"expected \(28, 28, 1\)"):
        formats.read_decoded_npz(path, 10, (28, 28, 1))
    path = write_npz(tmp_path / "b.npz", x=np.zeros((2, 28, 28), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(UvoodError, match="uint8 of shape"):
        formats.read_decoded_npz(path, 10, (28, 28, 1))


def test_jpeg_npz_reads_and_rejects_bad_offsets_and_bytes(tmp_path):
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    path = jpeg_npz(tmp_path / "a_jpeg.npz", images, [0, 1, 2])
    archive = formats.JpegArchive(path, 10)
    decoded = archive.decode()
    assert decoded.shape == (3, 32, 32, 3) and archive.y.tolist() == [0, 1, 2]
    arrays = dict(np.load(path))
    bad = write_npz(tmp_path / "b.npz", **{**arrays, "offsets": arrays["offsets"][:-1]})
    with pytest.raises(UvoodError, match="offsets"):
        formats.JpegArchive(bad, 10)
    data = arrays["data"].copy()
    data[: arrays["offsets"][1]] = 0  # image 0 is no longer a JPEG
    broken = formats.JpegArchive(write_npz(tmp_path / "c.npz", **{**arrays, "data": data}), 10)
    with pytest.raises(UvoodError, match="image 0 .* not a decodable JPEG"):
        broken[0]
    with pytest.raises(UvoodError, match="out of range"):
        formats.JpegArchive(jpeg_npz(tmp_path / "d.npz", images, [0, 1, 12]), 10)


# ------------------------------------------------------------------ official formats


def test_svhn_mat_label_10_is_digit_0(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="scipy (dev extra) reads SVHN .mat files")
    x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [9], [10]], np.uint8)})
    images = load("svhn", "test", data_dir=tmp_path)
    assert images.y.tolist() == [0, 1, 9, 0]
    assert np.array_equal(images.x[1], x[..., 1]) and images.x.shape == (4, 32, 32, 3)
    scipy_io.savemat(tmp_path / "train_32x32.mat", {"X": x[:, :, :2], "y": np.array([[1], [2], [3], [4]])})
    with pytest.raises(UvoodError, match=r"\(32, 32, 3, N\)"):
        load("svhn", "train", data_dir=tmp_path)


def cifar_batch(path, data, labels):
    with open(path, "wb") as handle:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data,
                     b"filenames": [b"x.png"] * len(labels)}, handle, protocol=2)


def test_cifar10_python_batches_and_restricted_unpickler(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    cifar_batch(folder / "test_batch", data, [0, 1, 2, 3, 9])
    images = load("cifar10-official", "test", data_dir=tmp_path)
    assert images.x.shape == (5, 32, 32, 3) and images.y.tolist() == [0, 1, 2, 3, 9]
    assert np.array_equal(images.x[0, :, :, 1], data[0, 1024:2048].reshape(32, 32))  # R plane, G plane, B plane
    cifar_batch(folder / "test_batch", data, [0, 1, 2, 3, 10])
    with pytest.raises(UvoodError, match="out of range"):
        formats.read_cifar10_batch(folder / "test_batch")

    class Evil:
        def __reduce__(self):
            return (print, ("should never run",))

    (folder / "evil").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(UvoodError, match="not allowed"):
        formats.read_cifar10_batch(folder / "evil")
    with pytest.raises(UvoodError, match="data_batch_1"):
        load("cifar10-official", "train", data_dir=tmp_path)


def idx_bytes(array, dims):
    header = bytes([0, 0, 8, len(dims)]) + np.asarray(dims, ">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def test_mnist_idx_raw_and_gz(tmp_path):
    x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(x, x.shape))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.array([7, 2, 1]), (3,))))
    images, labels = formats.read_mnist_idx(tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (3, 28, 28, 1) and np.array_equal(images[..., 0], x) and labels.tolist() == [7, 2, 1]
    (tmp_path / "short").write_bytes(idx_bytes(x, x.shape)[:-10])
    with pytest.raises(UvoodError, match="bytes, expected"):
        formats.read_idx(tmp_path / "short")


def test_image_folder(tmp_path):
    for name, size in (("cats", (20, 30)), ("dogs", (40, 25))):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    images = datasets.image_folder(tmp_path, size=16)
    assert images.x.shape == (4, 16, 16, 3) and images.y.tolist() == [0, 0, 1, 1]
    assert images.classes == ("cats", "dogs") and images.identity.startswith("folder:")
    (tmp_path / "dogs" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UvoodError, match="bad.jpg"):
        datasets.image_folder(tmp_path)


def test_cli_list_and_verify(data_dir, capsys):
    import argparse

    from uvood.data.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["data", "verify", "mnist", "--data-dir", str(data_dir)])
    assert args.func(args) == 0
    args = parser.parse_args(["data", "list", "--data-dir", str(data_dir)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "ok       mnist/test" in out and "CIFAR-10 (JPEG copy)" in out


def test_sha256_constants_agree_with_the_data_readme(data_dir):
    readme = (data_dir / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in readme.splitlines()
            if line.startswith("| ") and ".npz" in line}
    for ds in datasets.DATASETS.values():
        for split, file in ds.files.items():
            if file in rows:
                assert ds.sha256[split].startswith(rows[file]), file


def test_size_only_for_variable_size_sets_and_identity_of_oversized_limit(data_dir):
    with pytest.raises(UvoodError, match="variable-size data sets only"):
        load("mnist", "test", data_dir=data_dir, size=32)
    assert load("mnist", "test", data_dir=data_dir, limit=10**6).identity.endswith("/all")


def test_identity_without_decoding_matches_load(data_dir, monkeypatch):
    cases = [("mnist", "test", None, None), ("mnist", "test", 500, None), ("mnist", "test", 10**6, None),
             ("cifar10", "test", 300, None), ("textures", "all", 5, 32)]
    expected = [load(n, s, data_dir=data_dir, limit=lim, size=size).identity for n, s, lim, size in cases]
    # identity() must not decode an image: make decoding fail
    monkeypatch.setattr(datasets.formats.JpegArchive, "image", lambda *a: pytest.fail("decoded an image"))
    monkeypatch.setattr(datasets.formats, "read_decoded_npz", lambda *a: pytest.fail("read the images"))
    got = [datasets.identity(n, s, data_dir=data_dir, limit=lim, size=size) for n, s, lim, size in cases]
    assert got == expected


def test_folder_identity_reads_no_image_and_fails_clearly(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "0.png")
    expected = datasets.image_folder(tmp_path, size=4).identity
    monkeypatch.setattr(datasets.formats.Image, "open", lambda *a: pytest.fail("opened an image"))
    assert datasets.folder_identity(tmp_path, size=4)[::2] == (expected, 1)
    with pytest.raises(UvoodError, match="image folder not found"):
        datasets.folder_identity(tmp_path / "missing")
