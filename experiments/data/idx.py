"""Fashion-MNIST and MNIST from their original IDX files (``.gz`` or not).

Both datasets ship as four files in the IDX format of LeCun's MNIST page::

  train-images-idx3-ubyte.gz  magic 0x00000803, dims (N, 28, 28), uint8 pixels
  train-labels-idx1-ubyte.gz  magic 0x00000801, dims (N,), uint8 labels
  t10k-images-idx3-ubyte.gz   the test split, likewise
  t10k-labels-idx1-ubyte.gz

An IDX file is a big-endian header ``0x00 0x00 <type> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the data. Only unsigned bytes (type 0x08) are
read here. The whole split is decoded once into memory (Fashion-MNIST's
training split is 47 MB) and cached per process, so the many runs of
``experiments.reproduce`` read the files once.

``data.name="fashion_mnist"`` reads ``data.data_dir``, by default the Debian
package ``dataset-fashion-mnist``'s ``/usr/share/datasets/fashion-mnist``;
``data.name="mnist"`` has no packaged copy, so it needs ``data.data_dir``.
"""

import dataclasses
import functools
import gzip
import os
import zlib

import numpy as np

_UBYTE = 0x08
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclasses.dataclass(frozen=True)
class IdxDataset:
  """Where an IDX dataset lives by default and how to get it."""

  title: str
  default_dir: str | None
  apt_package: str | None
  site: str


IDX_DATASETS = {
    "fashion_mnist": IdxDataset(
        "Fashion-MNIST", "/usr/share/datasets/fashion-mnist",
        "dataset-fashion-mnist", "https://github.com/zalandoresearch/fashion-mnist"),
    "mnist": IdxDataset("MNIST", None, None, "http://yann.lecun.com/exdb/mnist/"),
}

# The ten Fashion-MNIST labels, in label order.
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


class IdxFormatError(ValueError):
  """An IDX file is truncated, corrupt or not the kind of IDX file expected."""


def _how_to_get(name: str) -> str:
  spec = IDX_DATASETS[name]
  files = ", ".join(f"{f}.gz" for pair in _FILES.values() for f in pair)
  ways = []
  if spec.apt_package:
    ways.append(f"`apt-get install -y {spec.apt_package}` (installs them in "
                f"{spec.default_dir}, the default data_dir)")
  ways.append(f"download the four files {files} from {spec.site} into a directory "
              "and pass it as --config.data.data_dir=DIR")
  return "To get them: " + ", or ".join(ways) + "."


def resolve_dir(name: str, data_dir: str | None) -> str:
  """The directory that holds ``name``'s four files; raises if one is missing.

  Raises:
    FileNotFoundError: naming the path looked at and how to get the files.
  """
  spec = IDX_DATASETS[name]
  directory = data_dir or spec.default_dir
  if directory is None:
    raise FileNotFoundError(
        f"data.name={name!r} has no default location: set data.data_dir to the directory"
        f" holding the {spec.title} IDX files. {_how_to_get(name)}")
  for split in _FILES:
    for stem in _FILES[split]:
      if _find(directory, stem) is None:
        raise FileNotFoundError(
            f"{spec.title} not found: no {os.path.join(directory, stem)}.gz (nor the"
            f" uncompressed {stem}) in data_dir={directory!r}. {_how_to_get(name)}")
  return directory


def _find(directory: str, stem: str) -> str | None:
  """The ``.gz`` file of ``stem`` in ``directory``, else the plain one, else None."""
  for path in (os.path.join(directory, stem + ".gz"), os.path.join(directory, stem)):
    if os.path.isfile(path):
      return path
  return None


def read_idx(path: str, ndim: int) -> np.ndarray:
  """The uint8 array of an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

  Args:
    path: the file.
    ndim: the number of dimensions expected (3 for images, 1 for labels).

  Returns:
    uint8 array of the shape in the header, e.g. (N, 28, 28) or (N,).

  Raises:
    IdxFormatError: truncated or corrupt compression, a wrong magic number, or a
      data length that does not match the header.
  """
  fix = "Delete it and get it again (reinstall the package or re-download the file)."
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      with open(path, "rb") as f:
        raw = f.read()
  except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
    raise IdxFormatError(f"{path} is truncated or not a valid gzip file ({e}). {fix}") from None
  expected_magic = bytes((0, 0, _UBYTE, ndim))
  if raw[:4] != expected_magic:
    raise IdxFormatError(
        f"{path}: wrong magic number {raw[:4].hex()} (expected {expected_magic.hex()}: an"
        f" IDX file of unsigned bytes with {ndim} dimension{'s' * (ndim > 1)}). Is it the"
        f" right file, and not corrupt? {fix}")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise IdxFormatError(f"{path} is truncated inside its header. {fix}")
  shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  size = int(np.prod(shape))
  if len(raw) - header != size:
    raise IdxFormatError(
        f"{path}: the header announces shape {shape} ({size} bytes of data) but the file"
        f" holds {len(raw) - header}. {fix}")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


@functools.lru_cache(maxsize=4)
def _load(directory: str, split: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, H, W, 1), labels int64 (N,)) of a split; ``stamp`` keys the cache."""
  del stamp  # Only part of the cache key: a replaced file is read again.
  image_path, label_path = (_find(directory, stem) for stem in _FILES[split])
  images = read_idx(image_path, 3)
  labels = read_idx(label_path, 1)
  if len(images) != len(labels):
    raise IdxFormatError(
        f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)}"
        " labels: the two files are not of the same split or one is damaged.")
  return images[..., None], labels.astype(np.int64)


class IdxSource:
  """One split of an IDX dataset in memory.

  ``source[i] == {"image": uint8 (H, W, 1), "label": int}``; 10 classes.

  Raises:
    FileNotFoundError: a file is missing (the message says how to get them).
    IdxFormatError: a file is damaged or the counts of images and labels differ.
  """

  num_classes = 10

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    if name not in IDX_DATASETS:
      raise ValueError(f"Unknown IDX dataset {name!r}; known: {sorted(IDX_DATASETS)}.")
    if split not in _FILES:
      raise ValueError(f"{name} has splits {tuple(_FILES)}, got {split!r}.")
    directory = os.path.abspath(resolve_dir(name, data_dir))
    paths = [_find(directory, stem) for stem in _FILES[split]]
    stamp = tuple((os.path.getmtime(p), os.path.getsize(p)) for p in paths)
    self._images, self.labels = _load(directory, split, stamp)
    if self.labels.size and self.labels.max() >= self.num_classes:
      raise IdxFormatError(
          f"{paths[1]} has label {self.labels.max()}; {name} has {self.num_classes}"
          " classes (0-9).")
    self.image_shape = tuple(self._images.shape[1:])

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self._images[index], "label": int(self.labels[index])}
