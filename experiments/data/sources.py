"""Random-access image sources with one contract.

A source has ``len(source)``, ``source[i] -> {"image": uint8 (H, W, C), "label": int}``,
``source.num_classes``, ``source.image_shape`` (native (H, W, C), None for a side that
varies between images) and ``source.labels`` (int64 (N,), every example's label, used to
split and subsample without touching the images of the examples left out).
"""

import dataclasses
import difflib
import functools
import os
import re
from typing import Protocol, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from experiments.data.idx import IDX_DATASETS


class Source(Protocol):
  """The contract shared by every source in this package."""

  num_classes: int
  image_shape: tuple[int | None, int | None, int]
  labels: np.ndarray

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict: ...


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset was asked for but is not prepared in ArrayRecord format."""


@dataclasses.dataclass(frozen=True)
class TfdsKeys:
  """Where a TFDS dataset keeps its image and label, and which split is its test set."""

  image: str = "image"
  label: str = "label"
  test_split: str = "test"


# Datasets that differ from the defaults; any other TFDS name uses TfdsKeys().
TFDS_KEYS = {
    "smallnorb": TfdsKeys(label="label_category"),
    "food101": TfdsKeys(test_split="validation"),
    "imagenet2012": TfdsKeys(test_split="validation"),
    "places365_small": TfdsKeys(test_split="validation"),
}


class TfdsSource:
  """One split of a prepared TFDS dataset, read through ``tfds.data_source`` (no TensorFlow).

  Images come back decoded by TFDS as uint8 (H, W, C) numpy arrays.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared as ArrayRecord under ``data_dir``.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    self._keys = TFDS_KEYS.get(name, TfdsKeys())
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
      raise ValueError(unknown_dataset_message(name, str(e))) from None
    try:
      self._records = builder.as_data_source(split=split)
    except Exception as e:  # TFDS raises a different error for each way of not being ready.
      if builder.is_prepared():
        raise
      raise DatasetNotPreparedError(
          f"TFDS dataset {name!r} (split {split!r}) is not prepared in ArrayRecord format"
          f" under data_dir={builder.data_dir!r}. Preparing needs TensorFlow and network"
          " access once; training does not. Run `pip install \"ot_transfer_jax[prepare]\"`"
          f" then `tfds build {name} --data_dir={builder.data_dir_root}"
          " --file_format=array_record` (or in Python: `tfds.builder(name,"
          " data_dir=DIR, file_format='array_record').download_and_prepare()`), or set"
          " `data_dir` to where it is already prepared.") from e
    features = self._records.dataset_info.features
    self.num_classes = features[self._keys.label].num_classes
    self.image_shape = tuple(features[self._keys.image].shape)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    record = self._records[index]
    return {"image": _as_hwc(record[self._keys.image]), "label": int(record[self._keys.label])}

  @functools.cached_property
  def labels(self) -> np.ndarray:
    # One pass over the split; it decodes the images too (TFDS can only skip decoding
    # with TensorFlow installed).
    return np.array([self._records[i][self._keys.label] for i in range(len(self))], np.int64)


def unknown_dataset_message(name: str, tfds_message: str) -> str:
  """One paragraph for a ``data.name`` TFDS does not know: the nearest names,
  not TFDS's message, which lists its whole catalogue (hundreds of lines)."""
  # TFDS's own suggestion ("Did you mean: cifar1000 -> cifar100 ?"), then
  # difflib over the catalogue it lists ("\t- name" lines).
  suggested = re.findall(r"Did you mean: \S+ -> (\S+?) ?\?", tfds_message)
  catalogue = re.findall(r"^\s*- (\S+)$", tfds_message, re.M)
  local = ["digits", *sorted(IDX_DATASETS)]
  suggested += difflib.get_close_matches(name, local + catalogue, n=3, cutoff=0.6)
  suggested = list(dict.fromkeys(s for s in suggested if s != name))[:3]
  hint = f" Did you mean {' or '.join(map(repr, suggested))}?" if suggested else ""
  return (f"data.name={name!r} is not a known dataset.{hint} Use one of {local}, a "
          "TFDS dataset name (the TFDS catalogue lists them), or 'folder:/root' for your"
          " own images in /root/{train,test}/<class name>/.")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class ImageFolderSource:
  """Images laid out as ``root/<class name>/<image>.{jpg,jpeg,png,bmp}``.

  Class names sorted alphabetically give labels 0..K-1. Images are decoded with PIL to
  RGB uint8 (H, W, 3) at their native size; resizing happens in the input pipeline.
  """

  def __init__(self, root: str | os.PathLike):
    root = os.fspath(root)
    layout = (f"expected an image folder laid out as {root}/<class name>/<image>"
              f" with extensions {IMAGE_EXTENSIONS}")
    if not os.path.isdir(root):
      raise FileNotFoundError(f"No directory {root!r}: {layout}.")
    self.class_names = sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for label, name in enumerate(self.class_names):
      files = sorted(f for f in os.listdir(os.path.join(root, name))
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      paths += [os.path.join(root, name, f) for f in files]
      labels += [label] * len(files)
    if not paths:
      raise FileNotFoundError(
          f"Found no images in {root!r} ({len(self.class_names)} class subdirectories): {layout}.")
    self._paths = paths
    self.labels = np.array(labels, np.int64)
    self.num_classes = len(self.class_names)
    self.image_shape = (None, None, 3)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict:
    with Image.open(self._paths[index]) as image:
      return {"image": np.asarray(image.convert("RGB")), "label": int(self.labels[index])}


class SubsetSource:
  """The examples ``indices`` of ``parent``, labels mapped through ``label_map``.

  ``label_map`` is int (num_parent_classes,): new label of each original label (-1 for
  classes left out, which ``indices`` must not contain).
  """

  def __init__(self, parent: Source, indices: Sequence[int], label_map: np.ndarray):
    self._parent = parent
    self._indices = np.asarray(indices, np.int64)
    self._label_map = np.asarray(label_map, np.int64)
    self.num_classes = int(self._label_map.max()) + 1
    self.image_shape = parent.image_shape

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict:
    example = self._parent[int(self._indices[index])]
    return {"image": example["image"], "label": int(self._label_map[example["label"]])}

  @functools.cached_property
  def labels(self) -> np.ndarray:
    return self._label_map[self._parent.labels[self._indices]]


def _as_hwc(image: np.ndarray) -> np.ndarray:
  """(H, W) or (H, W, C) -> uint8 (H, W, C)."""
  image = np.asarray(image, np.uint8)
  return image[..., None] if image.ndim == 2 else image
