"""Batches from a source with grain's random-access ``MapDataset``.

Every batch is a pure function of (seed, step): example order is a permutation keyed on
(seed, epoch) and augmentation draws from a generator keyed on (seed, global example
index). Resuming at ``start_step`` is therefore exact with no iterator state to
checkpoint, and the global batch does not depend on the number of processes: process p
reads rows [p * B_local, (p + 1) * B_local) of it.
"""

import functools
import sys
from typing import Iterator, Optional

import grain
import numpy as np
from PIL import Image

from experiments.data.sources import Source

AUGMENTATIONS = ("none", "crop_flip", "imagenet")
_CROP_PAD = 4
_RESIZED_CROP_SCALE = (0.08, 1.0)
_RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def check_augment(augment: str, image_size: Optional[int]) -> None:
  """Raises ``ValueError`` for an augmentation :func:`train_batches` cannot do
  (the job checks it before the teacher trains)."""
  if augment not in AUGMENTATIONS:
    raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}.")
  if augment == "imagenet" and image_size is None:
    raise ValueError("augment='imagenet' needs an image_size to resize crops to.")


def train_batches(
    source: Source, *, global_batch_size: int, seed: int, augment: str,
    image_size: int | None, mean: np.ndarray, std: np.ndarray, process_index: int = 0,
    process_count: int = 1, start_step: int = 0, num_threads: int = 2,
) -> Iterator[dict]:
  """Infinite training batches: epochs repeat, reshuffled each epoch.

  Args:
    source: random-access source of ``{"image": uint8 (H, W, C), "label": int}``.
    global_batch_size: G, examples per step summed over processes.
    seed: determines order and augmentation.
    augment: 'none' (resize/center-crop to ``image_size``), 'crop_flip' (that, then
      zero-pad 4 + random crop + horizontal flip: CIFAR style) or 'imagenet' (random
      resized crop of the native image + horizontal flip).
    image_size: S, output side; None keeps the native size ('none'/'crop_flip' only).
    mean, std: float (C,) per-channel statistics of images scaled to [0, 1].
    process_index, process_count: this process's rows of the global batch.
    start_step: first step to produce; batches equal those of an uninterrupted run.
    num_threads: grain threads decoding/augmenting batches ahead.

  Returns:
    Iterator of ``{"image": float32 (G / process_count, S, S, C) normalised,
    "label": int32 (G / process_count,)}``; the k-th item is step ``start_step + k``.
  """
  local = _local_batch_size(global_batch_size, process_count)
  check_augment(augment, image_size)
  # Independent seeds for order and augmentation, so neither stream echoes the other.
  order_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))

  def augment_example(example: dict, rng: np.random.Generator) -> dict:
    image = example["image"]
    if augment == "imagenet":
      image = random_resized_crop(image, image_size, rng)
    else:
      image = random_crop(fit_image(image, image_size), _CROP_PAD, rng)
    if rng.random() < 0.5:
      image = image[:, ::-1]
    return {"image": image, "label": example["label"]}

  n = len(source)
  # grain's index_shuffle costs ~0.4 ms per index on a small dataset (cycle walking); a
  # cached numpy permutation per epoch costs O(n) once per epoch.
  examples = grain.MapDataset.range(sys.maxsize).map(
      lambda i: source[int(_epoch_order(order_seed, i // n, n)[i % n])])
  if augment == "none":
    examples = examples.map(lambda ex: {"image": fit_image(ex["image"], image_size),
                                        "label": ex["label"]})
  else:
    examples = examples.random_map(augment_example, seed=augment_seed)
  # Local batch k holds global rows [k * B_local, (k + 1) * B_local); step s of process p
  # is local batch s * process_count + p.
  batches = examples.batch(local)[start_step * process_count + process_index::process_count]
  return _iterate(batches.map(lambda b: _normalize(b, mean, std)), num_threads)


def eval_batches(
    source: Source, *, batch_size: int, image_size: int | None, mean: np.ndarray,
    std: np.ndarray, process_index: int = 0, process_count: int = 1, num_threads: int = 2,
) -> Iterator[dict]:
  """One in-order pass over ``source``; the last global batch is padded and masked.

  ``batch_size`` is global and sharded across processes like ``train_batches``; every
  process yields the same number of batches, ceil(N / batch_size).

  Returns:
    Iterator of ``{"image": float32 (B_local, S, S, C), "label": int32 (B_local,),
    "mask": bool (B_local,)}``: ``mask`` is False on padding rows, so that summing a
    per-example metric times ``mask`` over all processes counts every example once.
  """
  local = _local_batch_size(batch_size, process_count)
  n = len(source)
  padded = -(-n // batch_size) * batch_size

  def example(index: int) -> dict:
    if index < n:
      ex = source[index]
      return {"image": fit_image(ex["image"], image_size), "label": ex["label"], "mask": True}
    # Padding row: shaped like a real example, zero image, masked out.
    image = np.zeros_like(fit_image(source[0]["image"], image_size))
    return {"image": image, "label": 0, "mask": False}

  batches = grain.MapDataset.range(padded).map(example).batch(local)
  batches = batches[process_index::process_count]
  return _iterate(batches.map(lambda b: _normalize(b, mean, std)), num_threads)


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """int64 (n,): the order of examples in ``epoch``, a fresh permutation per (seed, epoch)."""
  return np.random.default_rng((seed, epoch)).permutation(n)


def fit_image(image: np.ndarray, size: int | None) -> np.ndarray:
  """uint8 (H, W, C) -> (size, size, C): shorter side resized to ``size``, then center crop.

  ``size=None`` or an image already (size, size) returns the image unchanged.
  """
  h, w = image.shape[:2]
  if size is None or (h, w) == (size, size):
    return image
  scale = size / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  # One PIL call crops the box (in source pixels) and resizes it.
  box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
  return _resize(image, size, box)


def random_crop(image: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 (H, W, C) -> (H, W, C): zero-pad ``pad`` on each side, crop at a random offset."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  top, left = rng.integers(0, 2 * pad + 1, size=2)
  return padded[top:top + h, left:left + w]


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 (H, W, C) -> (size, size, C): Inception-style crop (area 8-100%, aspect 3/4-4/3).

  After 10 rejected draws it falls back to the center crop of ``fit_image``.
  """
  h, w = image.shape[:2]
  log_ratio = np.log(_RESIZED_CROP_RATIO)
  for _ in range(10):
    area = h * w * rng.uniform(*_RESIZED_CROP_SCALE)
    ratio = np.exp(rng.uniform(*log_ratio))
    crop_w, crop_h = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
    if 0 < crop_w <= w and 0 < crop_h <= h:
      top, left = rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
      return _resize(image, size, (left, top, left + crop_w, top + crop_h))
  return fit_image(image, size)


def _resize(image: np.ndarray, size: int, box: tuple[float, ...]) -> np.ndarray:
  """uint8 (H, W, C) -> (size, size, C): the ``box`` (left, top, right, bottom) resized."""
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((size, size), Image.BILINEAR, box=box))
  return out[..., None] if channels == 1 else out


def _normalize(batch: dict, mean: np.ndarray, std: np.ndarray) -> dict:
  """uint8 images -> float32 ``(x / 255 - mean) / std``; labels -> int32."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  images = (batch["image"].astype(np.float32) / 255 - mean) / std
  return {**batch, "image": images, "label": batch["label"].astype(np.int32)}


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1:
    raise ValueError(
        f"Batch size {global_batch_size}: it must be at least 1. Set the "
        "config's batch_size, eval_batch_size and analysis.batch_size to "
        "positive numbers.")
  if global_batch_size % process_count:
    raise ValueError(f"Batch size {global_batch_size} is not divisible by the"
                     f" {process_count} processes.")
  return global_batch_size // process_count


def _iterate(batches: grain.MapDataset, num_threads: int) -> Iterator[dict]:
  # A small prefetch buffer: an element here is a whole batch, not one example.
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
  return iter(batches.to_iter_dataset(options))
