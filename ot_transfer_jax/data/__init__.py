"""Data: sources (TFDS via ArrayRecord, IDX files, image folders, embedded digits) and grain
batches.

Needs the ``experiments`` extra (tfds, grain, scikit-learn, pillow); the rest of
the library does not.
"""

try:  # Fail with the fix, not a bare ModuleNotFoundError, on a core-only install.
  import grain, PIL, sklearn, tensorflow_datasets  # noqa: E401,F401
except ImportError as err:
  raise ImportError(
      f"ot_transfer_jax.data needs the experiments extra ({err.name} is not "
      "installed): pip install 'ot_transfer_jax[experiments]' (from a checkout: "
      "pip install -e '.[experiments]' -c constraints.txt).") from err

from ot_transfer_jax.data.datasets import (
    Datasets, channel_stats, default_config, get_datasets, split_indices)
from ot_transfer_jax.data.digits import DigitsSource, OtDigits
from ot_transfer_jax.data.idx import (
    FASHION_MNIST_CLASSES, IDX_DATASETS, IdxFormatError, IdxSource, read_idx)
from ot_transfer_jax.data.pipeline import (
    AUGMENTATIONS, eval_batches, fit_image, random_crop, random_resized_crop, train_batches)
from ot_transfer_jax.data.sources import (
    TFDS_KEYS, DatasetNotPreparedError, ImageFolderSource, Source, SubsetSource, TfdsKeys,
    TfdsSource)

__all__ = [
    "AUGMENTATIONS", "FASHION_MNIST_CLASSES", "IDX_DATASETS", "TFDS_KEYS",
    "DatasetNotPreparedError", "Datasets", "DigitsSource", "IdxFormatError", "IdxSource",
    "ImageFolderSource", "OtDigits", "Source", "SubsetSource", "TfdsKeys", "TfdsSource",
    "channel_stats", "default_config", "eval_batches", "fit_image", "get_datasets",
    "random_crop", "random_resized_crop", "read_idx", "split_indices", "train_batches",
]
