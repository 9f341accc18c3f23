"""Tests of experiments.data.idx: IDX files (Fashion-MNIST, MNIST) written by the tests."""

import gzip
import os
import shutil

import numpy as np
import pytest

from experiments import data
from experiments.data import idx

from idx_support import FILES, idx_bytes, write_dataset, write_idx

REAL_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def dataset_dir(tmp_path):
  arrays = write_dataset(tmp_path)
  return tmp_path, arrays


def test_reads_what_was_written_with_a_channel_axis(dataset_dir):
  directory, arrays = dataset_dir
  for split in ("train", "test"):
    source = data.IdxSource("fashion_mnist", split, str(directory))
    images, labels = arrays[split]
    assert len(source) == len(labels) and source.image_shape == (28, 28, 1)
    np.testing.assert_array_equal(source.labels, labels)
    example = source[3]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (28, 28, 1)
    np.testing.assert_array_equal(example["image"][..., 0], images[3])
    assert example["label"] == labels[3]


def test_uncompressed_files_are_read_too(tmp_path):
  rng = np.random.default_rng(1)
  for split, n in (("train", 20), ("test", 10)):
    image_file, label_file = FILES[split]
    write_idx(tmp_path / image_file, rng.integers(0, 256, (n, 28, 28)), compress=False)
    write_idx(tmp_path / label_file, np.arange(n) % 10, compress=False)
  source = data.IdxSource("mnist", "test", str(tmp_path))
  np.testing.assert_array_equal(source.labels, np.arange(10))


def test_goes_through_the_pipeline_with_classes_subsampling_and_val(dataset_dir):
  directory, arrays = dataset_dir
  cfg = {"name": "fashion_mnist", "data_dir": str(directory), "classes": (7, 2, 9),
         "samples_per_class": 3, "val_per_class": 4, "seed": 5}
  ds = data.get_datasets(cfg)
  assert (ds.num_classes, ds.image_shape) == (3, (28, 28, 1))
  assert (len(ds.train), len(ds.val)) == (9, 12)
  np.testing.assert_array_equal(np.bincount(ds.train.labels), [3, 3, 3])
  test_labels = arrays["test"][1]
  kept = test_labels[np.isin(test_labels, (7, 2, 9))]
  np.testing.assert_array_equal(ds.test.labels, np.select([kept == 7, kept == 2], [0, 1], 2))
  again = data.get_datasets({**cfg, "seed": 6})
  assert not np.array_equal(
      np.stack([ds.train[i]["image"] for i in range(9)]),
      np.stack([again.train[i]["image"] for i in range(9)]))
  batch = next(data.train_batches(ds.train, global_batch_size=4, seed=0, augment="none",
                                  image_size=None, mean=ds.mean, std=ds.std))
  assert batch["image"].shape == (4, 28, 28, 1) and set(batch["label"]) <= {0, 1, 2}


def test_missing_directory_names_the_path_and_both_ways_to_get_the_files(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as e:
    data.get_datasets({"name": "fashion_mnist", "data_dir": str(missing)})
  message = str(e.value)
  assert str(missing / "train-images-idx3-ubyte.gz") in message
  assert "apt-get install -y dataset-fashion-mnist" in message
  assert "--config.data.data_dir" in message and "t10k-labels-idx1-ubyte.gz" in message


def test_one_missing_file_is_named(dataset_dir):
  directory, _ = dataset_dir
  os.remove(directory / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
    data.IdxSource("fashion_mnist", "train", str(directory))


def test_mnist_needs_a_data_dir():
  with pytest.raises(FileNotFoundError, match="no default location.*data_dir"):
    data.get_datasets({"name": "mnist"})


def test_truncated_gzip_is_a_clear_error(dataset_dir):
  directory, _ = dataset_dir
  path = directory / "train-images-idx3-ubyte.gz"
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(data.IdxFormatError, match="truncated or not a valid gzip"):
    data.IdxSource("fashion_mnist", "train", str(directory))


def test_not_gzip_at_all_is_a_clear_error(dataset_dir):
  directory, _ = dataset_dir
  (directory / "train-labels-idx1-ubyte.gz").write_bytes(b"<html>not found</html>")
  with pytest.raises(data.IdxFormatError, match="train-labels-idx1-ubyte.gz"):
    data.IdxSource("fashion_mnist", "train", str(directory))


def test_wrong_magic_number_is_named(dataset_dir):
  directory, _ = dataset_dir
  # A label file (1 dimension) where the image file (3 dimensions) should be.
  shutil.copy(directory / "train-labels-idx1-ubyte.gz", directory / "train-images-idx3-ubyte.gz")
  with pytest.raises(data.IdxFormatError, match="wrong magic number 00000801.*00000803"):
    data.IdxSource("fashion_mnist", "train", str(directory))


def test_data_shorter_than_the_header_says_is_an_error(tmp_path):
  encoded = idx_bytes(np.zeros((5, 28, 28), np.uint8))
  path = tmp_path / "short.gz"
  with gzip.open(path, "wb") as f:
    f.write(encoded[:-28 * 28])  # One image missing; the gzip stream itself is valid.
  with pytest.raises(data.IdxFormatError, match=r"shape \(5, 28, 28\).*holds 3136"):
    idx.read_idx(str(path), 3)


def test_image_and_label_counts_must_agree(dataset_dir):
  directory, _ = dataset_dir
  write_idx(directory / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))
  with pytest.raises(data.IdxFormatError, match="40 images but .* 7 labels"):
    data.IdxSource("fashion_mnist", "test", str(directory))


@pytest.mark.skipif(not os.path.isdir(REAL_DIR),
                    reason=f"Fashion-MNIST is not installed in {REAL_DIR} "
                           "(apt-get install -y dataset-fashion-mnist)")
def test_real_fashion_mnist():
  train = data.IdxSource("fashion_mnist", "train")
  test = data.IdxSource("fashion_mnist", "test")
  assert (len(train), len(test)) == (60000, 10000)
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  # Published statistics of the training images in [0, 1]: mean 0.2860, std 0.3530.
  ds = data.get_datasets({"name": "fashion_mnist", "classes": (5, 6, 7, 8, 9),
                          "samples_per_class": 10, "val_per_class": 50})
  assert (len(ds.train), len(ds.val), len(ds.test), ds.num_classes) == (50, 250, 5000, 5)
  full = data.channel_stats(train, None, seed=0, max_examples=4096)
  np.testing.assert_allclose(full[0], [0.2860], atol=0.01)
  np.testing.assert_allclose(full[1], [0.3530], atol=0.01)
