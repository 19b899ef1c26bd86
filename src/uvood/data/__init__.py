"""Named data sets, file formats and cross-domain transforms.

``load(name, split, data_dir=None, limit=None)`` -> :class:`ImageSet` (uint8 NHWC images,
int64 labels, ``identity`` cache key, ``num_classes``); ``to_model_format`` turns uint8
NHWC images into a model's float NCHW input in [0, 1].
"""

from .datasets import DATASETS, ImageSet, data_dir, image_folder, info, list_datasets, load, locate, sample
from .transforms import describe, imagenet_input, to_model_format

__all__ = ["DATASETS", "ImageSet", "data_dir", "describe", "image_folder", "imagenet_input", "info", "list_datasets",
           "load", "locate", "sample", "to_model_format"]
