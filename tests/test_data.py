"""Tests of experiments.data: sources, splits, and deterministic grain batches."""

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from experiments import data

STATS = {"mean": np.array([0.5], np.float32), "std": np.array([0.25], np.float32)}


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_digits_splits_are_fixed_and_uint8():
  train, test = data.DigitsSource("train"), data.DigitsSource("test")
  assert (len(train), len(test)) == (1198, 599)
  example = train[0]
  assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
  assert max(train[i]["image"].max() for i in range(50)) == 255
  assert set(np.unique(train.labels)) == set(range(10)) == set(np.unique(test.labels))
  ds = data.get_datasets({"name": "digits"})
  assert (ds.num_classes, ds.image_shape, len(ds.val)) == (10, (8, 8, 1), 0)
  assert ds.mean.shape == ds.std.shape == (1,) and 0 < ds.mean[0] < 1
  again = data.get_datasets(data.default_config())
  np.testing.assert_array_equal(ds.test.labels, again.test.labels)


def test_classes_are_kept_and_relabelled_in_order():
  ds = data.get_datasets({"name": "digits", "classes": [7, 5]})
  assert ds.num_classes == 2
  raw = data.DigitsSource("test")
  assert len(ds.test) == np.isin(raw.labels, [7, 5]).sum()
  kept = raw.labels[np.isin(raw.labels, [7, 5])]
  np.testing.assert_array_equal(ds.test.labels, np.where(kept == 7, 0, 1))
  assert {ds.train[i]["label"] for i in range(len(ds.train))} == {0, 1}


def test_subsampling_is_seeded_balanced_and_disjoint_from_val():
  labels = data.DigitsSource("train").labels
  label_map = np.arange(10)
  split = lambda seed, k: data.split_indices(labels, label_map, samples_per_class=k,
                                             val_per_class=5, val_fraction=None, seed=seed)
  train, val = split(0, 7)
  assert np.all(np.bincount(labels[train]) == 7) and np.all(np.bincount(labels[val]) == 5)
  assert not set(train) & set(val)
  np.testing.assert_array_equal(train, split(0, 7)[0])
  assert not np.array_equal(train, split(1, 7)[0])
  # A larger training set keeps the same val and contains the smaller one.
  bigger_train, same_val = split(0, 20)
  np.testing.assert_array_equal(val, same_val)
  assert set(train) <= set(bigger_train)

  ds = data.get_datasets({"name": "digits", "samples_per_class": 7, "val_fraction": 0.1})
  assert len(ds.train) == 70 and np.all(np.bincount(ds.train.labels) == 7)
  assert 100 < len(ds.val) < 140


def test_train_fraction_keeps_a_share_of_each_class():
  labels = data.DigitsSource("train").labels
  train, val = data.split_indices(labels, np.arange(10), samples_per_class=None,
                                  val_per_class=5, val_fraction=None, seed=0,
                                  train_fraction=0.15)
  available = np.bincount(labels) - 5
  np.testing.assert_array_equal(np.bincount(labels[train]), np.ceil(0.15 * available))
  assert not set(train) & set(val)
  with pytest.raises(ValueError, match="at most one of samples_per_class and train_fraction"):
    data.get_datasets({"name": "digits", "samples_per_class": 3, "train_fraction": 0.5})
  with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\]"):
    data.get_datasets({"name": "digits", "train_fraction": 0.0})


def test_too_many_samples_per_class_names_the_class():
  expected = r"Class 3 has \d+ training examples available .* samples_per_class=1000"
  with pytest.raises(ValueError, match=expected):
    data.get_datasets({"name": "digits", "classes": [3], "samples_per_class": 1000})


def test_unknown_config_key_is_rejected():
  with pytest.raises(ValueError, match="samples_per_clas"):
    data.get_datasets({"name": "digits", "samples_per_clas": 3})


@pytest.mark.parametrize("augment,image_size", [("none", None), ("crop_flip", 8), ("imagenet", 6)])
def test_train_batches_depend_only_on_seed_and_step(augment, image_size):
  source = data.DigitsSource("test")
  batches = lambda seed, **kw: data.train_batches(
      source, global_batch_size=256, seed=seed, augment=augment, image_size=image_size,
      **STATS, **kw)
  first = take(batches(0), 6)  # 6 * 256 > 599: crosses epochs.
  size = image_size or 8
  assert first[0]["image"].shape == (256, size, size, 1) and first[0]["image"].dtype == np.float32
  assert first[0]["label"].dtype == np.int32
  assert_batches_equal(first, take(batches(0), 6))
  assert_batches_equal(first[4:], take(batches(0, start_step=4), 2))
  assert not np.array_equal(first[0]["label"], next(batches(1))["label"])
  # Every example appears once per epoch.
  labels = np.concatenate([b["label"] for b in first])
  np.testing.assert_array_equal(np.bincount(labels[:599]), np.bincount(source.labels))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_concatenate_to_the_global_batch(process_count):
  source = data.DigitsSource("test")
  kw = dict(global_batch_size=64, seed=3, augment="crop_flip", image_size=None, **STATS)
  whole = take(data.train_batches(source, start_step=2, **kw), 3)
  shards = [take(data.train_batches(source, start_step=2, process_index=p,
                                    process_count=process_count, **kw), 3)
            for p in range(process_count)]
  for step, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
          batch[key], np.concatenate([shard[step][key] for shard in shards]))


def test_eval_batches_cover_every_example_once_with_mask():
  source = data.DigitsSource("test")
  kw = dict(batch_size=64, image_size=None, **STATS)
  shards = [list(data.eval_batches(source, process_index=p, process_count=2, **kw))
            for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == 10  # ceil(599 / 64)
  merged = {key: np.concatenate([b[key] for step in zip(*shards) for b in step])
            for key in ("image", "label", "mask")}
  assert merged["mask"].sum() == 599 and not merged["mask"][599:].any()
  np.testing.assert_array_equal(merged["label"][:599], source.labels)
  expected = (source[598]["image"].astype(np.float32) / 255 - 0.5) / 0.25
  np.testing.assert_allclose(merged["image"][598], expected, rtol=1e-6)


@pytest.mark.parametrize("batches", ["train", "eval"])
def test_a_batch_size_below_1_is_a_clear_error(batches):
  source = data.DigitsSource("test")
  make = {"train": lambda: data.train_batches(
              source, global_batch_size=0, seed=0, augment="none",
              image_size=None, **STATS),
          "eval": lambda: data.eval_batches(source, batch_size=0,
                                            image_size=None, **STATS)}[batches]
  with pytest.raises(ValueError, match="Batch size 0: it must be at least 1"):
    make()


def write_pngs(root, sizes_by_class):
  for name, sizes in sizes_by_class.items():
    (root / name).mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
      pixels = np.full((h, w, 3), 40 * i, np.uint8)
      Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_source_and_config(tmp_path):
  write_pngs(tmp_path / "train", {"dog": [(20, 30), (12, 12)], "cat": [(16, 40)]})
  write_pngs(tmp_path / "test", {"dog": [(9, 9)], "cat": [(30, 20)]})
  source = data.ImageFolderSource(tmp_path / "train")
  assert source.class_names == ["cat", "dog"] and list(source.labels) == [0, 1, 1]
  assert source[1]["image"].shape == (20, 30, 3) and source[1]["image"].dtype == np.uint8
  ds = data.get_datasets({"name": f"folder:{tmp_path}", "image_size": 16})
  assert (ds.num_classes, ds.image_shape, len(ds.train), len(ds.test)) == (2, (16, 16, 3), 3, 2)
  batch = next(data.train_batches(ds.train, global_batch_size=4, seed=0, augment="imagenet",
                                  image_size=16, mean=ds.mean, std=ds.std))
  assert batch["image"].shape == (4, 16, 16, 3)
  with pytest.raises(ValueError, match="set image_size"):
    data.get_datasets({"name": f"folder:{tmp_path}"})


def test_empty_image_folder_explains_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match="<class name>/<image>"):
    data.ImageFolderSource(tmp_path)
  (tmp_path / "cat").mkdir()
  with pytest.raises(FileNotFoundError, match="no images"):
    data.ImageFolderSource(tmp_path)
  with pytest.raises(FileNotFoundError, match="train/<class name>"):
    data.get_datasets({"name": f"folder:{tmp_path}"})


def test_tfds_source_reads_mock_data_without_tensorflow():
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.get_datasets({"name": "cifar10"})
    assert (len(ds.train), ds.num_classes, ds.image_shape) == (12, 10, (32, 32, 3))
    batch = next(data.train_batches(ds.train, global_batch_size=8, seed=0, augment="crop_flip",
                                    image_size=None, mean=ds.mean, std=ds.std))
    assert batch["image"].shape == (8, 32, 32, 3)
    # Birds: images of varying size, resized by the pipeline.
    birds = data.get_datasets({"name": "caltech_birds2011", "image_size": 24})
    assert birds.num_classes == 200
    evals = list(data.eval_batches(birds.test, batch_size=8, image_size=24, mean=birds.mean,
                                   std=birds.std))
    assert [b["image"].shape for b in evals] == [(8, 24, 24, 3)] * 2


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as error:
    data.TfdsSource("cifar10", "train", data_dir=str(tmp_path))
  message = str(error.value)
  assert "cifar10" in message and str(tmp_path) in message
  assert 'pip install "ot_transfer_jax[prepare]"' in message
  assert "tfds build cifar10" in message and "--file_format=array_record" in message


@pytest.mark.parametrize("name,nearest", [("cifar1000", "'cifar100'"),
                                          ("stanford_dog", "'stanford_dogs'"),
                                          ("fashion_mnis", "'fashion_mnist'")])
def test_unknown_dataset_name_suggests_the_nearest_not_the_catalogue(
    name, nearest):
  with pytest.raises(ValueError) as error:
    data.get_datasets({"name": name})
  message = str(error.value)
  assert f"data.name={name!r} is not a known dataset. Did you mean {nearest}" in (
      message)
  # TFDS's own message lists hundreds of datasets, one per line.
  assert "\n" not in message and len(message) < 400, message


def test_ot_digits_builds_as_array_record_without_tensorflow(tmp_path):
  data.OtDigits(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  ds = data.get_datasets({"name": "ot_digits", "data_dir": str(tmp_path)})
  assert (len(ds.train), len(ds.test), ds.image_shape) == (1198, 599, (8, 8, 1))
  # Same examples as the in-memory source (TFDS stores them in its own order).
  in_memory = data.DigitsSource("test")
  key = lambda source: sorted(source[i]["image"].tobytes() + bytes([source[i]["label"]])
                              for i in range(len(source)))
  assert key(ds.test) == key(in_memory)
