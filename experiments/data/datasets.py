"""``get_datasets(cfg)``: train / val / test sources and normalisation statistics.

Validation is carved out of the training split (for model selection); the test split
is only for final numbers.
"""

import dataclasses
import os
from typing import Any, Iterator, Mapping, Sequence

import ml_collections
import numpy as np

from experiments.data import pipeline
from experiments.data.digits import DigitsSource
from experiments.data.idx import IDX_DATASETS, IdxSource
from experiments.data.sources import (
    TFDS_KEYS, ImageFolderSource, Source, SubsetSource, TfdsKeys, TfdsSource)

_STATS_EXAMPLES = 1024  # Enough for per-channel mean/std to ~1%, cheap on any dataset.


def default_config() -> ml_collections.ConfigDict:
  """The data section of an experiment config, every key with its default.

  name: "digits", "fashion_mnist" or "mnist" (the four original IDX files), a TFDS
    name (prepared as ArrayRecord), or "folder:/root" with
    /root/{train,test}/<class name>/<image>.
  data_dir: for fashion_mnist/mnist, the directory of the IDX files (None: Debian's
    /usr/share/datasets/fashion-mnist; mnist has no default); for TFDS, its data_dir
    (None: TFDS's default).
  image_size: side S images are resized/cropped to (None: native size).
  classes: original label ids to keep, relabelled 0..k-1 in this order (None: all).
  samples_per_class: training examples kept per class, drawn with ``seed`` (None: all).
  train_fraction: instead, the fraction of each class's training examples kept
    (at least one per class), e.g. 0.15 for the 15 % data-scarce protocol.
  val_per_class / val_fraction: validation examples per class taken out of the training
    split before subsampling (at most one of the two; None for both: no validation).
  seed: seed of the val carve-out and of the subsampling.
  """
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict({
      "name": "digits",
      "data_dir": placeholder(str),
      "image_size": placeholder(int),
      "classes": placeholder(tuple),
      "samples_per_class": placeholder(int),
      "train_fraction": placeholder(float),
      "val_per_class": placeholder(int),
      "val_fraction": placeholder(float),
      "seed": 0,
  })


@dataclasses.dataclass(frozen=True)
class Datasets:
  """Sources of ``{"image": uint8 (H, W, C), "label": int in [0, num_classes)}``.

  ``image_shape`` is (H, W, C) after resizing to ``image_size``; ``mean``/``std`` are
  float32 (C,) statistics of the training images scaled to [0, 1], for normalisation.
  """

  train: Source
  val: Source
  test: Source
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: np.ndarray
  std: np.ndarray


def get_datasets(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> Datasets:
  """Builds the splits described by ``cfg`` (keys of ``default_config()``; missing = default)."""
  defaults = default_config()
  unknown = set(cfg.keys()) - set(defaults.keys())
  if unknown:
    raise ValueError(f"Unknown data config keys {sorted(unknown)}; known: {sorted(defaults)}.")
  c = {key: cfg[key] if key in cfg else defaults[key] for key in defaults}

  train_full, test_full = _load_splits(c["name"], c["data_dir"])
  image_shape = _image_shape(c["name"], train_full.image_shape, c["image_size"])
  label_map = _label_map(train_full.num_classes, c["classes"])
  subsample = c["samples_per_class"] is not None or c["train_fraction"] is not None
  carve_val = c["val_per_class"] is not None or c["val_fraction"] is not None
  if c["classes"] is None and not subsample and not carve_val:
    train, val = train_full, SubsetSource(train_full, [], label_map)  # Skips a label scan.
  else:
    train_idx, val_idx = split_indices(
        train_full.labels, label_map, samples_per_class=c["samples_per_class"],
        val_per_class=c["val_per_class"], val_fraction=c["val_fraction"], seed=c["seed"],
        train_fraction=c["train_fraction"])
    train, val = SubsetSource(train_full, train_idx, label_map), SubsetSource(
        train_full, val_idx, label_map)
  if c["classes"] is None:
    test = test_full
  else:
    test = SubsetSource(test_full, np.flatnonzero(label_map[test_full.labels] >= 0), label_map)
  if len(train) == 0:
    raise ValueError(
        f"The training set of {c['name']!r} is empty after the validation carve-out "
        f"and subsampling (val_per_class={c['val_per_class']}, val_fraction="
        f"{c['val_fraction']}, samples_per_class={c['samples_per_class']}, "
        f"train_fraction={c['train_fraction']}). Lower the validation share.")
  mean, std = channel_stats(train, c["image_size"], seed=c["seed"])
  return Datasets(train=train, val=val, test=test, num_classes=int(label_map.max()) + 1,
                  image_shape=image_shape, mean=mean, std=std)


def split_indices(
    labels: np.ndarray, label_map: np.ndarray, *, samples_per_class: int | None,
    val_per_class: int | None, val_fraction: float | None, seed: int,
    train_fraction: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Disjoint, class-stratified (train, val) indices into a training split.

  Args:
    labels: int (N,) original labels of the training split.
    label_map: int (num_original_classes,): new label per original one, -1 = dropped.
    samples_per_class: train examples kept per class (None: all left after val).
    val_per_class, val_fraction: val examples per class, as a count or a fraction of
      the class (at most one set).
    train_fraction: instead of ``samples_per_class``, keep ``ceil(fraction * n)`` of
      the ``n`` examples left in each class after val.
    seed: each class is permuted once; val takes its head and train what follows, so
      for a fixed seed val does not depend on ``samples_per_class`` and train sets
      of increasing ``samples_per_class`` are nested.

  Returns:
    (train int64 (n_train,), val int64 (n_val,)), each sorted.

  Raises:
    ValueError: a class has fewer than ``samples_per_class`` examples left after val.
  """
  if val_per_class is not None and val_fraction is not None:
    raise ValueError("Set at most one of val_per_class and val_fraction.")
  if val_fraction is not None and not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
  if train_fraction is not None:
    if samples_per_class is not None:
      raise ValueError("Set at most one of samples_per_class and train_fraction.")
    if not 0 < train_fraction <= 1:
      raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}.")
  rng = np.random.default_rng(seed)
  train, val = [], []
  kept = np.flatnonzero(label_map >= 0)
  for original in kept[np.argsort(label_map[kept])]:  # In new-label order.
    members = rng.permutation(np.flatnonzero(labels == original))
    n_val = (round(val_fraction * len(members)) if val_fraction is not None
             else val_per_class or 0)
    rest = members[n_val:]
    keep = samples_per_class
    if train_fraction is not None:
      keep = max(1, int(np.ceil(train_fraction * len(rest))))
    if samples_per_class is not None and samples_per_class > len(rest):
      raise ValueError(
          f"Class {original} has {len(rest)} training examples available (after {n_val}"
          f" taken for validation) but samples_per_class={samples_per_class} was asked.")
    val.append(members[:n_val])
    train.append(rest[:keep])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def channel_stats(source: Source, image_size: int | None, *, seed: int,
                  max_examples: int = _STATS_EXAMPLES) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std), float32 (C,), of images in [0, 1] after ``fit_image``.

  Computed over at most ``max_examples`` examples drawn with ``seed``.
  """
  rng = np.random.default_rng(seed)
  picked = np.sort(rng.permutation(len(source))[:max_examples])
  total = total_sq = count = 0
  for i in picked:
    pixels = pipeline.fit_image(source[int(i)]["image"], image_size).astype(np.float64) / 255
    pixels = pixels.reshape(-1, pixels.shape[-1])
    total = total + pixels.sum(0)
    total_sq = total_sq + np.square(pixels).sum(0)
    count += len(pixels)
  mean = total / count
  return mean.astype(np.float32), np.sqrt(total_sq / count - mean**2).astype(np.float32)


def _load_splits(name: str, data_dir: str | None) -> tuple[Source, Source]:
  """(train, test) sources of a dataset name."""
  if name == "digits":
    return DigitsSource("train"), DigitsSource("test")
  if name in IDX_DATASETS:
    return IdxSource(name, "train", data_dir), IdxSource(name, "test", data_dir)
  if name.startswith("folder:"):
    root = name.removeprefix("folder:")
    if not all(os.path.isdir(os.path.join(root, s)) for s in ("train", "test")):
      raise FileNotFoundError(
          f"{name!r} needs {root}/train/<class name>/<image> and"
          f" {root}/test/<class name>/<image>.")
    train, test = (ImageFolderSource(os.path.join(root, s)) for s in ("train", "test"))
    if train.class_names != test.class_names:
      raise ValueError(f"{root}/train and {root}/test have different class directories.")
    return train, test
  keys = TFDS_KEYS.get(name, TfdsKeys())
  return TfdsSource(name, "train", data_dir), TfdsSource(name, keys.test_split, data_dir)


def _image_shape(name: str, native: Sequence[int | None], image_size: int | None):
  """(H, W, C) of the images the pipeline produces."""
  if image_size is not None:
    return (image_size, image_size, native[-1])
  if None in native:
    raise ValueError(f"Images of {name!r} vary in size; set image_size.")
  return tuple(native)


def _label_map(num_classes: int, classes: Sequence[int] | None) -> np.ndarray:
  """int64 (num_classes,): new label of each original label, -1 for dropped ones."""
  if classes is None:
    return np.arange(num_classes)
  if len(set(classes)) != len(classes) or not all(0 <= c < num_classes for c in classes):
    raise ValueError(f"classes must be distinct ids in [0, {num_classes}), got {classes}.")
  label_map = np.full(num_classes, -1, np.int64)
  label_map[list(classes)] = np.arange(len(classes))
  return label_map


def test_batches(restored: Any, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The test split of a restored run (``ot_transfer_jax.inference.restore``), in order.

  Yields:
    ``(images, class_ids)``: uint8 ``(B, H, W, C)`` at the model's resolution, as
    ``restored.predict`` takes them, and int64 ``(B,)`` dataset class ids (the last batch
    may be smaller).
  """
  ds = get_datasets(restored.config.data)
  size = restored.config.data.get("image_size")
  for start in range(0, len(ds.test), batch_size):
    examples = [ds.test[i] for i in range(start, min(start + batch_size, len(ds.test)))]
    yield (np.stack([pipeline.fit_image(e["image"], size) for e in examples]),
           restored.class_ids[np.array([e["label"] for e in examples])])
