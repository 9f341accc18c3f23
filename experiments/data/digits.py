"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits.

It ships inside scikit-learn, so it needs neither network nor disk preparation; it is
what the tests, smoke runs and the digits 0-4 -> 5-9 transfer experiment use.

The same data is also registered as the TFDS dataset ``ot_digits``, which exercises the
real ArrayRecord ``tfds.data_source`` path offline and without TensorFlow:
``OtDigits(data_dir=DIR, file_format="array_record").download_and_prepare()``, then
``get_datasets({"name": "ot_digits", "data_dir": DIR})``. (The ``tfds build`` command
line imports TensorFlow, so use Python.) Images are stored as a uint8 ``Tensor``
feature, not an ``Image`` feature: encoding PNGs in TFDS needs TensorFlow.
"""

import functools

import numpy as np
import tensorflow_datasets as tfds

SPLITS = ("train", "test")
NUM_CLASSES = 10
_TEST_FRACTION = 1 / 3
_SPLIT_SEED = 0


@functools.cache
def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 (N, 8, 8, 1) in 0..255, labels int64 (N,)) of a fixed split.

  The split is stratified by label, 1/3 test, with a fixed seed: 1198 train, 599 test.
  """
  if split not in SPLITS:
    raise ValueError(f"digits has splits {SPLITS}, got {split!r}.")
  # Imported here: scikit-learn takes ~1.5 s to import, which every run of
  # another dataset would pay.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  digits = load_digits()
  # Pixel values are 0..16; rescale to the uint8 range every other source uses.
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  train_idx, test_idx = train_test_split(
      np.arange(len(labels)), test_size=_TEST_FRACTION, stratify=labels,
      random_state=_SPLIT_SEED)
  idx = np.sort(train_idx if split == "train" else test_idx)
  return images[idx], labels[idx]


class DigitsSource:
  """In-memory random-access source over one split of the 8x8 digits.

  ``source[i] == {"image": uint8 (8, 8, 1), "label": int}``.
  """

  num_classes = NUM_CLASSES
  image_shape = (8, 8, 1)

  def __init__(self, split: str):
    self._images, self.labels = _digits_split(split)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self._images[index], "label": int(self.labels[index])}


class OtDigits(tfds.core.GeneratorBasedBuilder):
  """TFDS builder for the digits splits of ``DigitsSource`` (registered as ``ot_digits``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sklearn load_digits, stratified 2/3 train, 1/3 test."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's 8x8 digits, pixel values rescaled to 0..255.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    images, labels = _digits_split(split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
