"""Cross-domain transforms: any images -> a model's float N x C x H x W input in [0, 1].

Input images follow the one layout rule, :data:`uvood.validation.LAYOUT_RULE`: N x H x W
(greyscale), N x H x W x C or N x C x H x W with C in (1, 3), uint8 (0..255) or float in [0, 1].

``to_model_format(images, channels, size, mode)``:

* ``mode="paste"`` (the seed code's convention, exact, no interpolation): a grey 28 x 28
  image is copied into every output channel and placed at the top-left of a zero
  ``size`` x ``size`` canvas; in the reverse direction the output takes channel 0 and the
  top-left ``size`` x ``size`` crop. In general: channels 1 -> C repeat, C -> 1 channel 0;
  smaller images are zero-padded bottom/right, larger ones cropped top-left.
* ``mode="resize"``: bilinear interpolation with antialiasing (``F.interpolate(...,
  antialias=True, align_corners=False)``) to ``size`` x ``size``, then channel conversion:
  grey -> RGB repeats, RGB -> grey is the ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B``.

``imagenet_eval(images, size)`` is the standard ImageNet evaluation transform: shorter side
to ``round(size / 0.875)`` (bilinear, antialiased), central ``size`` x ``size`` crop, grey
copied to RGB (the model normalises inside itself).

The transform used is part of every result; :func:`describe` gives its stable name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UvoodError
from ..validation import LAYOUT_RULE, check_finite, image_layout

MODES = ("resize", "paste")
LUMA = (0.299, 0.587, 0.114)


def _as_nchw(images) -> torch.Tensor:
    """uint8 or float images in any layout of :data:`uvood.validation.LAYOUT_RULE` -> N x C x H x W
    (a view, same dtype); floats must lie in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        a = np.asarray(images)
        # a read-only array (e.g. an image decoded by PIL) is copied: torch refuses to share it without a warning
        images = torch.as_tensor(a if a.flags.writeable else a.copy())
    x = images
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise UvoodError(f"images must be uint8 (0..255) or float in [0, 1], got {x.dtype}.")
    if x.ndim == 0 or x.shape[0] == 0:
        return torch.zeros(0, 1, 1, 1, dtype=x.dtype)
    x = image_layout(x, "images")
    if x.shape[1] not in (1, 3):
        raise UvoodError(f"images must have 1 or 3 channels (N x H x W x C or N x C x H x W with C in (1, 3)), "
                         f"got shape {tuple(x.shape)} read as N x C x H x W. " + LAYOUT_RULE)
    if x.is_floating_point():
        check_finite(x, "images")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise UvoodError(f"float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; pass uint8 "
                             "pixels (0..255) or divide by 255.")
    return x


def _convert_channels(x: torch.Tensor, channels: int, mode: str) -> torch.Tensor:
    """Float N x C x H x W -> N x channels x H x W."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        if mode == "paste":
            return x[:, :1].contiguous()
        weights = torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    raise UvoodError(f"cannot convert {have} channels to {channels}; supported: 1 <-> 3.")


def _paste(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    x = x[..., : min(h, size), : min(w, size)]
    return F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))


def to_model_format(images, channels: int, size: int, mode: str = "resize", batch: int = 4096) -> torch.Tensor:
    """Images by :data:`uvood.validation.LAYOUT_RULE` (array, tensor, or a sequence of H x W x C arrays of
    any sizes in ``resize`` mode) -> float32 N x ``channels`` x ``size`` x ``size`` in [0, 1]."""
    if mode not in MODES:
        raise UvoodError(f"mode must be one of {MODES}, got {mode!r}.")
    if channels not in (1, 3) or int(size) < 1:
        raise UvoodError(f"channels must be 1 or 3 and size positive, got channels={channels}, size={size}.")
    lazy = hasattr(images, "decode")  # a JpegArchive: variable-size images decoded one by one
    if lazy or (isinstance(images, Sequence) and not isinstance(images, np.ndarray)):
        shapes = {np.asarray(images[i]).shape for i in range(len(images))} if not lazy else set()
        if lazy or len(shapes) > 1:  # variable sizes: one image at a time
            out = [to_model_format(np.asarray(images[i])[None], channels, size, mode) for i in range(len(images))]
            return torch.cat(out) if out else torch.zeros(0, channels, size, size)
        images = np.stack([np.asarray(images[i]) for i in range(len(images))])
    x = _as_nchw(images)
    if len(x) == 0:
        return torch.zeros(0, channels, size, size)
    parts = []
    for start in range(0, len(x), batch):
        part = x[start:start + batch].float()
        part = part.div_(255.0) if x.dtype == torch.uint8 else part
        if mode == "paste":
            part = _paste(_convert_channels(part, channels, mode), size)
        else:
            if part.shape[-2:] != (size, size) and len(part):
                part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True,
                                     align_corners=False).clamp_(0.0, 1.0)
            part = _convert_channels(part, channels, mode)
        parts.append(part.contiguous())
    return torch.cat(parts)


def describe(source_shape: Sequence[int], channels: int, size: int, mode: str) -> str:
    """Stable name of a transform, e.g. ``paste:1x28x28->3x32x32`` (source given as H, W, C)."""
    h, w, c = (list(source_shape) + [1])[:3] if len(source_shape) == 2 else source_shape[-3:]
    if (c, h, w) == (channels, size, size):
        return f"identity:{c}x{h}x{w}"
    return f"{mode}:{c}x{h}x{w}->{channels}x{size}x{size}"


def imagenet_input(images, size: int = 224, batch: int = 256) -> torch.Tensor:
    """The 64 px -> 224 px ImageNet pipeline: RGB, bilinear antialiased resize to ``size``,
    float32 N x 3 x size x size in [0, 1] (the model normalises inside itself)."""
    return to_model_format(images, 3, size, "resize", batch=batch)


CROP_FRACTION = 0.875  # the ImageNet evaluation convention: 224 / 256


def resize_center_crop(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """uint8 H x W x C image: shorter side to ``resize`` px (PIL bilinear, antialiased; the longer
    side to ``int(resize * long / short)``), then the central ``crop`` x ``crop`` window (offsets
    ``round((side - crop) / 2)``), as torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` on a PIL
    image; grey stays grey."""
    from PIL import Image

    if crop > resize:
        raise UvoodError(f"the crop ({crop} px) must not exceed the resized shorter side ({resize} px).")
    image = np.asarray(image)
    im = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    short, long = sorted(im.size)
    new_long = max(resize, int(resize * long / short))  # torchvision's Resize(int) rounds the long side down
    w, h = (resize, new_long) if im.size[0] <= im.size[1] else (new_long, resize)
    if (w, h) != im.size:
        im = im.resize((w, h), Image.BILINEAR)
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))  # torchvision's CenterCrop
    out = np.asarray(im.crop((left, top, left + crop, top + crop)))
    return out[..., None] if out.ndim == 2 else out


def imagenet_eval(images, size: int, crop_fraction: float = CROP_FRACTION) -> torch.Tensor:
    """The standard ImageNet evaluation transform at a model's resolution ``size``: each uint8
    image (any size, grey or RGB; an array, a sequence or a lazy archive) has its shorter side
    resized to ``R = round(size / crop_fraction)`` (224 -> 256, 260 -> 297), then the central
    ``size`` x ``size`` crop is kept; grey is copied to 3 channels. Returns float32
    N x 3 x size x size in [0, 1]; the model normalises inside itself."""
    if not 0 < crop_fraction <= 1:
        raise UvoodError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
    resize = round(size / crop_fraction)
    out = torch.zeros(len(images), 3, size, size)
    for i in range(len(images)):
        crop = torch.from_numpy(np.array(resize_center_crop(images[i], resize, size)))
        out[i] = _convert_channels(crop.permute(2, 0, 1)[None].float().div_(255.0), 3, "resize")[0]
    return out
