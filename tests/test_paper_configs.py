"""Every paper-scale config and setting built and checked; one real training step end to end
(one setting per file by default, every setting and method on request).

The paper-scale configs are ``cifar100.py`` (one setting per network pair,
``PAIRS``) and ``imagenet_transfer.py`` (one per dataset, ``DATASETS``); a new
pair or dataset is covered without touching this file. Each method runs
through ``loop.train_and_evaluate`` on TFDS mock data (random images and
labels from the dataset's own feature spec, read through
``tfds.data_source``) with the config's own networks, layers, losses,
optimizer and augmentation; only sizes shrink, by the config's own
``smoke=True`` (``paper.smoke``: 1 step, batch 4, 64 px images, ImageNet
ResNets with one block per stage -- the same blocks and stage names: compiling
ResNet-101's 33 blocks took 2-4 minutes of CPU; tests/test_models.py builds
every depth -- and the ImageNet teacher at random initialisation). On mock
data the test adds: no validation carve-out (mock labels are spread over
100-200 classes, a few examples each), and a CIFAR teacher at random
initialisation (same architecture; ``teacher.source='random'``) instead of a
trained one.
"""

import importlib
import json
import math
import os
import time

import pytest
import tensorflow_datasets as tfds

from experiments import data, loop
from experiments.configs import paper
from experiments.metric_writers import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
MOCK_EXAMPLES = 8
# Compilation dominates (7-50 s a method on 2 CPU cores), and every loss
# method's code path is exercised per method by the digits configs' tests. So
# by default each config runs its most involved method, Omega_P (plus the
# analysis); PAPER_CONFIGS_ALL_METHODS=1 runs every method of every config
# it trains (with PAPER_CONFIGS_ALL=1, of every setting).
ALL_METHODS = os.environ.get("PAPER_CONFIGS_ALL_METHODS", "") == "1"
DEFAULT_METHODS = ("ot",)
# The paper-scale config files, and the argument naming each setting.
FILES = {"cifar100": "pair", "imagenet_transfer": "data"}


def _module(file):
  return importlib.import_module(f"experiments.configs.{file}")


def _settings():
  """``file.py:key=value`` of every setting of the paper-scale files."""
  out = []
  for file, key in FILES.items():
    module = _module(file)
    values = getattr(module, {"pair": "PAIRS", "data": "DATASETS"}[key])
    out.extend(f"{file}:{key}={v}" for v in values)
  return out


CONFIGS = _settings()
# A training step compiles a setting's two networks: 23-38 s of CPU each,
# 152 s for the five, a sixth of the CI's. By default one setting per file
# trains (every setting's config is still built and checked by the tests
# above, every network depth by tests/test_models.py);
# PAPER_CONFIGS_ALL=1 trains every setting.
TRAINED = (CONFIGS if os.environ.get("PAPER_CONFIGS_ALL", "") == "1" else
           ["cifar100:pair=resnet32x4_resnet8x4",
            "imagenet_transfer:data=stanford_dogs"])


def _get_config(name, method=None, smoke=False):
  """``name`` (``file:key=value``)'s config of ``method``."""
  file, arg = name.split(":")
  arg += f",method={method}" if method else ""
  return _module(file).get_config(arg + (",smoke=True" if smoke else ""))


def test_the_paper_configs_are_discovered():
  assert {"cifar100:pair=resnet32x4_resnet8x4", "cifar100:pair=wrn40_2_wrn16_2",
          "cifar100:pair=resnet56_resnet20", "imagenet_transfer:data=cub200",
          "imagenet_transfer:data=stanford_dogs"} <= set(CONFIGS)
  for file in FILES:
    with pytest.raises(ValueError, match=f"Unknown {FILES[file]}='nope'"):
      _module(file).get_config(f"{FILES[file]}=nope")


@pytest.mark.parametrize("file", FILES)
def test_docstring_launches_its_own_file(file):
  doc = _module(file).__doc__ or ""
  lines = [line for line in doc.splitlines() if "python -m experiments." in line]
  assert lines, f"{file}.py: no `python -m experiments.` launch line."
  # The --config argument may sit on a continuation line of the command.
  assert f"experiments/configs/{file}.py:{FILES[file]}=" in doc


@pytest.mark.parametrize("name", CONFIGS)
def test_every_method_is_selectable(name):
  file, arg = name.split(":")
  for method in _module(file).get_methods(arg):
    assert _get_config(name, method).method == method
    assert _get_config(name, method, smoke=True).method == method


@pytest.mark.parametrize("name", CONFIGS)
def test_protocol_sizes_are_consistent(name):
  """Schedule boundaries inside training; evaluation and checkpoints happen."""
  c = _get_config(name)
  assert all(0 < b < 1 for b in c.optimizer.step_boundaries)
  assert c.eval_every <= c.num_steps and c.checkpoint_every <= c.num_steps
  if c.data.name == "cifar100":
    n_train = 100 * (500 - c.data.val_per_class)
    assert c.eval_every == math.ceil(n_train / c.batch_size)  # One epoch.
    assert c.num_steps == 240 * c.eval_every
    assert c.teacher.job.num_steps == c.num_steps


@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_keeps_the_setting_and_shrinks_its_sizes(name):
  full, smoke = _get_config(name), _get_config(name, smoke=True)
  for c in (smoke, *([smoke.teacher.job] if smoke.teacher.job else [])):
    assert (c.num_steps, c.batch_size, c.eval_every) == (1, 4, 1)
  for key in ("loss", "optimizer"):
    assert smoke[key].to_json() == full[key].to_json(), key
  assert (smoke.augment, smoke.init_from_teacher, smoke.data.name) == (
      full.augment, full.init_from_teacher, full.data.name)
  assert smoke.model.name == full.model.name
  assert tuple(smoke.analysis.layers) == tuple(full.analysis.layers)[:1]
  if full.teacher.source == "torchvision":  # No weights file needed.
    assert smoke.teacher.source == "random"
    assert smoke.data.image_size == paper.SMOKE_IMAGE_SIZE
    assert dict(smoke.model.kwargs) == dict(smoke.teacher.kwargs) == dict(
        paper.SHALLOW)


def _on_mock_data(config, mock_num_classes, analysis=True):
  """The smoke config on mock data: no validation split, a trained teacher
  at random initialisation (same architecture, the job's label space).

  ``analysis=False`` drops the post-training OT analysis (method-independent
  code, slow for 2048-neuron layers on CPU).
  """
  c = config.copy_and_resolve_references()
  if not analysis:
    c.analysis.layers = ()
  c.data.val_per_class = None
  c.data.val_fraction = None
  c.data.samples_per_class = None
  side = c.data.image_size or 32
  t = c.teacher
  if t.source == "train":
    t.name = t.job.model.name
    t.kwargs = dict(t.job.model.kwargs)
    t.num_classes = mock_num_classes(t.job.data)
    t.source = "random"
    t.image_shape = (side, side, 3)
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


def test_one_setting_of_each_file_trains_by_default():
  assert set(TRAINED) <= set(CONFIGS)
  assert {name.split(":")[0] for name in TRAINED} == set(FILES)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_every_method_trains_one_step(name, tmp_path):
  file, arg = name.split(":")
  methods = (tuple(_module(file).get_methods(arg)) if ALL_METHODS
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
      tiny = _on_mock_data(_get_config(name, method, smoke=True),
                           mock_num_classes, analysis=i == 0)
      _check_run(tiny, method, str(tmp_path / method))
      timings[method] = round(time.perf_counter() - start, 1)
  print(f"{name}: seconds per method {timings}")
