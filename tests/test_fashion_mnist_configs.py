"""The Fashion-MNIST configs end to end on tiny IDX files written here (CI has no dataset).

The configs are ``<setting>.py:data=fashion_mnist`` and
``vit_distill.py:teacher=...``, read as reproduce and sweep read them
(``runs.load_config_module``). Each config runs its most involved method
through ``loop.train_and_evaluate`` with its own networks, layers and losses,
the teacher trained by its own ``teacher.job`` (2 steps); only sizes shrink,
by the configs' own ``smoke=True`` (common.SMOKE), and the data directory
points at the IDX files. The transfer run also moves both class splits and
K, which the configs must follow without other edits.
"""

import json
import math
import os
import re

import pytest

from experiments import loop, runs, sweep
from experiments.metric_writers import read_metrics

from idx_support import write_dataset
from test_configs import on_the_grid_or_past_an_edge

CONFIGS = ("transfer", "distill", "cross_arch")
ARG = "data=fashion_mnist"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "experiments", "configs")
# Transformer students: the teacher as the argument (docs/transformers.md).
VIT_ARGS = {"vit_distill": "teacher=vit", "vit_cross_arch": "teacher=small_cnn"}


def _module(name, smoke=False):
  path = (f"vit_distill.py:{VIT_ARGS[name]}" if name in VIT_ARGS
          else f"{name}.py:{ARG}")
  return runs.load_config_module(
      os.path.join(CONFIG_DIR, path + (",smoke=True" if smoke else "")))


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("fashion_mnist")
  write_dataset(path, n_train_per_class=12, n_test_per_class=3)
  return str(path)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  """One teacher directory per (config, teacher classes), shared by the tests."""
  root = tmp_path_factory.mktemp("teachers")

  def workdir(c):
    job = c.teacher.job
    key = f"{job.model.name}_{dict(job.model.kwargs)}_{job.data.classes}"
    return str(root / re.sub(r"[^A-Za-z0-9.]+", "_", key))

  return workdir


def _on_idx_files(name, method, data_dir):
  """``name``'s smoke config of ``method``, reading the IDX files."""
  c = _module(name, smoke=True).get_config(method)
  c = c.copy_and_resolve_references()
  for job in (c, c.teacher.job):
    job.data.data_dir = data_dir
  return c


@pytest.mark.parametrize("name", CONFIGS)
def test_docstring_sweep_and_methods(name):
  module = _module(name)
  doc = module.__doc__
  assert f"experiments/configs/{name}.py:{ARG} --seeds 10" in doc
  assert "python -m experiments.sweep" in doc
  methods = module.methods
  for method in methods:
    c = module.get_config(method)
    assert c.method == method and c.data.name == "fashion_mnist"
    # Every swept value is what the config uses (the sweep's choice is on
    # its grid, or past an edge: sweep --extensions).
    if method in module.SWEEP:
      key, grid = module.SWEEP[method]
      node = c
      for part in key.split("."):
        node = node[part]
      assert on_the_grid_or_past_an_edge(node, grid), (method, key, node)
  assert set(module.SWEEP) <= set(methods)


@pytest.mark.slow
@pytest.mark.parametrize("name,method,overrides", [
    # Other class splits and K, with nothing else changed.
    ("transfer", "delta",
     {"data.classes": (0, 2, 4), "teacher.job.data.classes": (1, 3, 5, 7, 9),
      "data.samples_per_class": 4}),
    # distill's KD and Omega_P + KD: the digits configs' test and the ViT
    # rows below (the same terms, the same reader).
    ("cross_arch", "ot", {}),
    # ViT student: token layers against a ViT's and a CNN's 7 x 7 stage3.
    pytest.param("vit_distill", "ot_kd", {}, marks=pytest.mark.slow),
    pytest.param("vit_cross_arch", "ot_kd", {}, marks=pytest.mark.slow),
])
def test_config_trains_on_idx_files(name, method, overrides, idx_dir, teachers, tmp_path):
  c = _on_idx_files(name, method, idx_dir)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  c.teacher.workdir = teachers(c)
  final = loop.train_and_evaluate(c, str(tmp_path / method))
  assert final["step"] == 2 and math.isfinite(final["test_accuracy"])
  assert final["best_val_accuracy"] is not None  # Selection on validation.
  (record,) = read_metrics(str(tmp_path / method), split="train")
  for term_name, term in c.loss.terms.items():
    values = [v for k, v in record.items() if k.startswith(f"reg/{term_name}")]
    assert values and all(math.isfinite(v) and v >= 0 for v in values), term_name
  teacher_final = json.load(open(os.path.join(c.teacher.workdir, loop.FINAL_METRICS)))
  assert teacher_final["step"] == 2
  if overrides:
    # num_classes follows data.classes: 3 classes for the student, 5 for the teacher.
    from ot_transfer_jax import inference
    student = inference.restore(str(tmp_path / method))
    teacher = inference.restore(c.teacher.workdir)
    assert student.variables["params"]["head"]["kernel"].shape[-1] == 3
    assert teacher.variables["params"]["head"]["kernel"].shape[-1] == 5
    assert student.config["data"]["samples_per_class"] == 4


@pytest.mark.slow
def test_sweep_chooses_on_validation_only(idx_dir, teachers, tmp_path):
  class Tiny:  # The config file with a one-method, two-value grid.
    SWEEP = {"ot": ("loss.terms.ot.weight", (0.01, 1.0))}

    @staticmethod
    def get_config(method=None):
      c = _on_idx_files("cross_arch", method, idx_dir)
      c.teacher.workdir = teachers(c)  # The cross_arch test's, when it ran.
      return c

  # Without extensions (two values: either best is at an edge).
  records, chosen = sweep.run_sweep(Tiny, str(tmp_path), [100],
                                    extensions=0)
  assert [r["value"] for r in records] == [0.01, 1.0]
  best = max(records, key=lambda r: r["val_accuracy_best"])
  assert chosen == {"ot": {"loss.terms.ot.weight": best["value"]}}
  table = sweep.markdown(records, chosen)
  assert "test" not in table.lower() and " *" in table
  for r in records:
    final = json.load(open(os.path.join(r["workdir"], loop.FINAL_METRICS)))
    assert final["seed"] == 100 and final["best_val_accuracy"] == r["val_accuracy_best"]


def test_choose_takes_the_best_validation_per_key_inside_the_grid_of_equals():
  # runs.bracket's rule, without extensions: of 0.1 and 1.0 (equal), the
  # one inside the grid.
  records = [{"method": "ot", "key": "k", "value": v, "val_accuracy_best": a, "seed": 1}
             for v, a in ((0.01, 0.8), (0.1, 0.9), (1.0, 0.9))]
  records.append({"method": "ot", "key": "eps", "value": 0.1, "val_accuracy_best": 0.7,
                  "seed": 1})
  records.append({"method": "kd", "key": "k", "value": 1.0, "val_accuracy_best": None,
                  "seed": 1})
  assert sweep.choose(records) == {"ot": {"k": 0.1, "eps": 0.1}}
  rerun = [{**records[0], "val_accuracy_best": 0.95}]
  merged = sweep.merge(records, rerun)
  assert len(merged) == len(records) and sweep.choose(merged)["ot"]["k"] == 0.01
