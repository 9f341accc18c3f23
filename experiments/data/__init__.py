"""Data: sources (TFDS via ArrayRecord, IDX files, image folders, embedded digits) and grain
batches; part of the experiment suite (the ``experiments`` extra: tfds, grain, scikit-learn,
pillow). The library (``ot_transfer_jax``) does not import it.
"""

from experiments.data.datasets import (
    Datasets, channel_stats, default_config, get_datasets, split_indices, test_batches)
from experiments.data.digits import DigitsSource, OtDigits
from experiments.data.idx import (
    FASHION_MNIST_CLASSES, IDX_DATASETS, IdxFormatError, IdxSource, read_idx)
from experiments.data.pipeline import (
    AUGMENTATIONS, check_augment, eval_batches, fit_image, random_crop, random_resized_crop, train_batches)
from experiments.data.sources import (
    TFDS_KEYS, DatasetNotPreparedError, ImageFolderSource, Source, SubsetSource, TfdsKeys,
    TfdsSource)

__all__ = [
    "AUGMENTATIONS", "FASHION_MNIST_CLASSES", "IDX_DATASETS", "TFDS_KEYS",
    "DatasetNotPreparedError", "Datasets", "DigitsSource", "IdxFormatError", "IdxSource",
    "ImageFolderSource", "OtDigits", "Source", "SubsetSource", "TfdsKeys", "TfdsSource",
    "channel_stats", "check_augment", "default_config", "eval_batches", "fit_image", "get_datasets",
    "random_crop", "random_resized_crop", "read_idx", "split_indices", "test_batches",
    "train_batches",
]
