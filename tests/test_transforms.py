"""Cross-domain transforms: paste (exact, seed-code convention), resize, channel rules."""

import numpy as np
import pytest
import torch

from uvood.data.transforms import describe, imagenet_input, to_model_format
from uvood.errors import UvoodError

rng = np.random.default_rng(0)


def test_paste_grey28_to_rgb32_is_the_seed_convention():
    x = rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    out = to_model_format(x, 3, 32, "paste")
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    expected = torch.from_numpy(x[..., 0]).float() / 255
    for channel in range(3):  # grey copied into every channel, top-left
        assert torch.equal(out[:, channel, :28, :28], expected)
    assert out[:, :, 28:, :].abs().sum() == 0 and out[:, :, :, 28:].abs().sum() == 0  # zero canvas


def test_paste_rgb32_to_grey28_takes_channel0_top_left_crop():
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = to_model_format(x, 1, 28, "paste")
    assert torch.equal(out[:, 0], torch.from_numpy(x[:, :28, :28, 0]).float() / 255)


def test_paste_round_trip_is_exact():
    x = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    there = (to_model_format(x, 3, 32, "paste") * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    back = (to_model_format(there, 1, 28, "paste") * 255).round().to(torch.uint8)
    assert torch.equal(back[:, 0], torch.from_numpy(x[..., 0]))


def test_resize_keeps_constant_images_and_uses_bt601_luma():
    x = np.zeros((2, 32, 32, 3), np.uint8)
    x[..., 0], x[..., 1], x[..., 2] = 200, 100, 50
    grey = to_model_format(x, 1, 28, "resize")
    assert grey.shape == (2, 1, 28, 28)
    luma = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255
    assert torch.allclose(grey, torch.full_like(grey, luma), atol=1e-5)
    up = to_model_format(np.full((1, 28, 28, 1), 77, np.uint8), 3, 32, "resize")
    assert torch.allclose(up, torch.full((1, 3, 32, 32), 77 / 255), atol=1e-5)


def test_resize_output_range_and_antialias_mean():
    x = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    out = to_model_format(x, 3, 32, "resize")
    assert out.min() >= 0 and out.max() <= 1
    # antialiased downsampling low-pass filters: noise averages out, the mean is kept
    assert abs(float(out.mean()) - x.mean() / 255) < 0.01
    assert float(out.std()) < 0.6 * x.std() / 255


def test_same_format_is_identity():
    x = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for mode in ("paste", "resize"):
        assert torch.equal(to_model_format(x, 3, 32, mode), torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)


def test_variable_size_sequence_and_imagenet_pipeline():
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (70, 30, 3), dtype=np.uint8)]
    assert to_model_format(images, 3, 32).shape == (2, 3, 32, 32)
    out = imagenet_input(rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    assert out.shape == (2, 3, 224, 224) and 0 <= float(out.min()) and float(out.max()) <= 1


def test_describe_names_the_transform():
    assert describe((28, 28, 1), 3, 32, "paste") == "paste:1x28x28->3x32x32"
    assert describe((32, 32, 3), 3, 32, "resize") == "identity:3x32x32"


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(UvoodError, match=r"float images must lie in \[0, 1\]"):
        to_model_format(np.full((1, 28, 28, 1), 255.0, np.float32), 1, 28)
    with pytest.raises(UvoodError, match="uint8 .0..255. or float"):
        to_model_format(np.zeros((1, 28, 28, 1), np.int32), 1, 28)
    with pytest.raises(UvoodError, match="mode"):
        to_model_format(np.zeros((1, 28, 28, 1), np.uint8), 1, 28, "stretch")
    with pytest.raises(UvoodError, match="N x H x W x C"):
        to_model_format(np.zeros((1, 28, 28, 5), np.uint8), 1, 28)


def test_imagenet_eval_at_its_own_resolution_is_the_central_crop():
    from uvood.data.transforms import imagenet_eval

    x = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)  # 224 / 0.875 = 256: no resize, crop 16..240
    out = imagenet_eval(x, 224)
    assert out.shape == (2, 3, 224, 224)
    assert torch.equal(out, torch.from_numpy(x[:, 16:240, 16:240]).permute(0, 3, 1, 2).float() / 255)


def test_imagenet_eval_resizes_the_shorter_side_like_antialiased_interpolate():
    from uvood.data.transforms import imagenet_eval

    # a smooth 300 x 450 image: PIL's antialiased bilinear and torch's agree within a grey level or two
    yy, xx = np.meshgrid(np.linspace(0, 1, 300), np.linspace(0, 1, 450), indexing="ij")
    image = np.stack([120 + 100 * np.sin(3 * yy), 128 + 90 * np.cos(4 * xx), 60 + 150 * yy * xx], -1)
    image = image.round().astype(np.uint8)
    out = imagenet_eval([image], 260)  # shorter side 300 -> 297, longer 450 -> int(297 * 1.5) = 445
    ref = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
                                          size=(297, 445), mode="bilinear", antialias=True, align_corners=False)
    top, left = round((297 - 260) / 2), round((445 - 260) / 2)
    ref = ref[..., top:top + 260, left:left + 260]
    assert out.shape == (1, 3, 260, 260) and (out - ref).abs().max() < 2.5 / 255
    assert (out - torch.roll(ref, 3, dims=-1)).abs().max() > 4 / 255  # a shifted crop is told apart


def test_imagenet_eval_copies_grey_to_rgb_and_rejects_bad_crops():
    from uvood.data.transforms import imagenet_eval, resize_center_crop

    out = imagenet_eval(np.full((3, 28, 28, 1), 91, np.uint8), 224)
    assert out.shape == (3, 3, 224, 224) and torch.allclose(out, torch.full_like(out, 91 / 255), atol=1e-6)
    with pytest.raises(UvoodError, match="must not exceed the resized shorter side"):
        resize_center_crop(np.zeros((8, 8, 3), np.uint8), 4, 6)
    with pytest.raises(UvoodError, match=r"crop_fraction must be in \(0, 1\]"):
        imagenet_eval(np.zeros((1, 8, 8, 3), np.uint8), 4, crop_fraction=1.5)


def test_read_only_images_convert_without_a_warning_and_are_not_shared():
    """A read-only array (what PIL's decoded images and memory-mapped files give) is copied, not shared with a
    torch warning ("The given NumPy array is not writable"); the values are those of a writable copy."""
    import warnings

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    ro = a.copy()
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_model_format(ro, channels=1, size=28)
    torch.testing.assert_close(out, to_model_format(a, channels=1, size=28), rtol=0, atol=0)
