"""Every paper-scale config, every method: one real training step end to end.

Configs are discovered by glob (every ``experiments/configs/*.py`` with a
``get_config``, except the small-data settings ``transfer``, ``distill`` and
``cross_arch`` and their ``digits_*`` / ``fashion_mnist_*`` aliases:
tests/test_experiment.py covers digits, tests/test_fashion_mnist_configs.py
writes Fashion-MNIST's IDX data, tests/test_configs.py the aliases), so
a new config is covered without touching this file. Each method runs through
``loop.train_and_evaluate`` on TFDS mock data (random images and labels
from the dataset's own feature spec, read through ``tfds.data_source``) with
the config's own networks, layers, losses, optimizer and augmentation; only
sizes shrink: 1 step, batch 4, small images, ImageNet ResNets with one block
per stage (the same blocks and stage names: compiling ResNet-101's 33 blocks
took 2-4 minutes of CPU; tests/test_models.py builds every depth), no
validation carve-out (mock labels are spread over 100-200 classes, a few
examples each), and the teacher at random initialisation (same architecture;
``teacher.source='random'``) instead of a trained / downloaded one.
"""

import glob
import importlib
import json
import math
import os
import time

import pytest
import tensorflow_datasets as tfds

from experiments import data, loop
from experiments.metric_writers import read_metrics
from ot_transfer_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
MOCK_EXAMPLES = 8
BATCH = 4
# ImageNet ResNets at 224 px compile and run slowly on CPU; 64 px keeps every
# stage (stage4 is 2 x 2) and every code path.
SMALL_IMAGE = 64
# ImageNet ResNets (stage_sizes) shrink to one block per stage.
SHALLOW = {"stage_sizes": (1, 1, 1, 1)}
# Compilation dominates (7-50 s a method on 2 CPU cores), and every loss
# method's code path is exercised per method by the digits configs' tests. So
# by default each config runs its most involved method, Omega_P (plus the
# analysis); PAPER_CONFIGS_ALL_METHODS=1 runs every method of every config.
ALL_METHODS = os.environ.get("PAPER_CONFIGS_ALL_METHODS", "") == "1"
DEFAULT_METHODS = ("ot",)
# One config per small-data setting, the dataset as an argument.
SETTINGS = ("transfer", "distill", "cross_arch")


def _paper_configs():
  names = []
  for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py"))):
    name = os.path.splitext(os.path.basename(path))[0]
    if name.startswith(("digits_", "fashion_mnist_", "_")) or name in SETTINGS:
      continue
    with open(path) as f:
      if "\ndef get_config(" in f.read():  # At module level (not common.py).
        names.append(name)
  return names


CONFIGS = _paper_configs()


def _module(name):
  return importlib.import_module(f"experiments.configs.{name}")


def test_the_paper_configs_are_discovered():
  assert {"cifar100_resnet32x4_resnet8x4", "cifar100_wrn40_2_wrn16_2",
          "cifar100_resnet56_resnet20", "cub200_resnet50",
          "stanford_dogs_resnet101"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_docstring_launches_its_own_file(name):
  doc = _module(name).__doc__ or ""
  lines = [line for line in doc.splitlines() if "python -m experiments." in line]
  assert lines, f"{name}.py: no `python -m experiments.` launch line."
  # The --config argument may sit on a continuation line of the command.
  assert f"experiments/configs/{name}.py" in doc
  config = _module(name).get_config()
  for method in config.method_order:
    assert _module(name).get_config(method).method == method


@pytest.mark.parametrize("name", CONFIGS)
def test_protocol_sizes_are_consistent(name):
  """Schedule boundaries inside training; evaluation and checkpoints happen."""
  c = _module(name).get_config()
  assert all(0 < b < 1 for b in c.optimizer.step_boundaries)
  assert c.eval_every <= c.num_steps and c.checkpoint_every <= c.num_steps
  if c.data.name == "cifar100":
    n_train = 100 * (500 - c.data.val_per_class)
    assert c.eval_every == math.ceil(n_train / c.batch_size)  # One epoch.
    assert c.num_steps == 240 * c.eval_every
    assert c.teacher.job.num_steps == c.num_steps
    assert c.teacher.job.model.name == c.teacher.name


def _tiny(config, method, mock_num_classes, analysis=True):
  """The config shrunk to one step on mock data; everything else kept.

  ``analysis=False`` drops the post-training OT analysis (method-independent
  code, slow for 2048-neuron layers on CPU); otherwise it keeps one layer.
  """
  c = config.copy_and_resolve_references()
  c.analysis.layers = tuple(c.analysis.layers)[:1] if analysis else ()
  c.num_steps = 1
  c.batch_size = BATCH
  c.eval_batch_size = 2 * BATCH
  c.log_every = c.eval_every = c.checkpoint_every = 1
  c.analysis.batch_size = BATCH
  if c.data.image_size is not None:
    c.data.image_size = SMALL_IMAGE
  c.data.val_per_class = None
  c.data.val_fraction = None
  c.data.samples_per_class = None
  side = c.data.image_size or 32
  t = c.teacher
  if t.source == "train":
    t.name = t.job.model.name
    t.num_classes = mock_num_classes(t.job.data)
  elif t.source == "torchvision":
    t.num_classes = 1000  # ImageNet.
  t.source = "random"
  t.image_shape = (side, side, 3)
  for model in (c.model, t):
    if model.name in models.MODEL_NAMES and hasattr(
        models.create_model(model.name, 1), "stage_sizes"):
      with model.kwargs.unlocked():
        model.kwargs.update(SHALLOW)
  return c


def _check_run(config, method, workdir):
  final = loop.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, loop.FINAL_METRICS)) as f:
    assert json.load(f) == final
  assert final["step"] == 1 and final["method"] == method
  assert math.isfinite(final["test_accuracy"]), method
  assert 0 <= final["test_accuracy"] <= 1, method
  # No validation split here: nothing is selected.
  assert final["best_step"] is None and final["best_val_accuracy"] is None

  (train_rec,) = read_metrics(workdir, split="train")
  assert math.isfinite(train_rec["loss"]) and train_rec["skipped"] == 0, (
      method, train_rec)
  for name, term in config.loss.terms.items():
    layers = zip(term.student_layers,
                 term.teacher_layers or term.student_layers)
    keys = ({f"reg/{name}/{s}->{t}" for s, t in layers} or
            {f"reg/{name}/{k}" for k in ("logits", "params")} & set(train_rec))
    assert keys and keys <= set(train_rec), (method, name, sorted(train_rec))
    assert all(math.isfinite(train_rec[k]) and train_rec[k] >= 0
               for k in keys), (method, name)
    if term.regularizer == "ot":
      assert any(k.startswith("matched_fraction/ot/") for k in train_rec)
    if term.regularizer == "l2_sp":
      # The student starts at the teacher: the L2-SP penalty starts at 0.
      assert train_rec["reg/l2_sp"] == pytest.approx(0.0, abs=1e-6), method
  with open(os.path.join(workdir, loop.ANALYSIS)) as f:
    analysis = json.load(f)
  assert analysis["layers"] == list(config.analysis.layers)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_every_method_trains_one_step(name, tmp_path):
  methods = (tuple(_module(name).get_config().method_order) if ALL_METHODS
             else DEFAULT_METHODS)
  timings = {}
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES,
                              policy=tfds.testing.MockPolicy.USE_CODE):

    def mock_num_classes(data_cfg):
      data_cfg = data_cfg.copy_and_resolve_references()
      for key in ("val_per_class", "val_fraction", "samples_per_class",
                  "train_fraction"):
        data_cfg[key] = None
      return data.get_datasets(data_cfg).num_classes

    for i, method in enumerate(methods):
      start = time.perf_counter()
      tiny = _tiny(_module(name).get_config(method), method,
                   mock_num_classes, analysis=i == 0)
      _check_run(tiny, method, str(tmp_path / method))
      timings[method] = round(time.perf_counter() - start, 1)
  print(f"{name}: seconds per method {timings}")
