"""Tiny IDX datasets written by the tests themselves (CI has no Fashion-MNIST)."""

import gzip
import os
import struct

import numpy as np

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
  """The IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian sizes, data."""
  array = np.asarray(array, np.uint8)
  header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.tobytes()


def write_idx(path, array: np.ndarray, compress: bool = True) -> str:
  """Writes ``array`` as an IDX file (gzip-compressed if ``compress``); returns the path."""
  path = os.fspath(path) + (".gz" if compress else "")
  opener = gzip.open if compress else open
  with opener(path, "wb") as f:
    f.write(idx_bytes(array))
  return path


def write_dataset(directory, n_train_per_class: int = 12, n_test_per_class: int = 4,
                  size: int = 28, seed: int = 0) -> dict:
  """A 10-class IDX dataset in ``directory``; each class has its own mean brightness,
  so a network can learn it. Returns ``{split: (images (N, size, size), labels (N,))}``."""
  rng = np.random.default_rng(seed)
  out = {}
  for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    rng.shuffle(labels)
    base = (labels.astype(np.float64) * 25)[:, None, None]
    images = np.clip(base + rng.normal(0, 20, (len(labels), size, size)), 0, 255)
    images = images.astype(np.uint8)
    image_file, label_file = FILES[split]
    write_idx(os.path.join(directory, image_file), images)
    write_idx(os.path.join(directory, label_file), labels)
    out[split] = (images, labels)
  return out
