"""The digits transfer job at smoke sizes (transfer.py:data=digits,smoke=True), shared by the end-to-end tests."""

import json
import os
import sys
import types

from experiments import loop
from experiments.configs import common, transfer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The job's sizes: 20 steps (evaluation and a checkpoint every 10), teacher 40.
TINY, TEACHER_TINY = common.SMOKE["digits"]
TEACHER_STEPS = TEACHER_TINY["num_steps"]
ARG = "data=digits,smoke=True"


def tiny_config(teacher_dir, method="ot", **overrides):
  c = transfer.get_config(f"{ARG},method={method}")
  c.update(overrides)
  c.teacher.workdir = str(teacher_dir)
  return c


def without_sweep(module):
  """``module`` (``runs.load_config_module``) without weight grids of its
  own: the tools' tests name every grid they train, whatever grids the
  config file gives its sweep."""
  return types.SimpleNamespace(**{**vars(module), "SWEEP": {}})


def config_flags(values: dict) -> list:
  """``--config.key=value`` flags of ``values`` (a command's overrides)."""
  return [f"--config.{k}={v}" for k, v in values.items()]


def cli_overrides(teacher_dir, **overrides):
  return config_flags({"teacher.workdir": str(teacher_dir), **overrides})


def main_command(workdir, teacher_dir, *extra, method="ot"):
  """``python -m experiments.main`` on the smoke digits transfer config."""
  return [sys.executable, "-m", "experiments.main", "--config",
          os.path.join(REPO, f"experiments/configs/transfer.py:{ARG},"
                       f"method={method}"),
          f"--workdir={workdir}", *cli_overrides(teacher_dir), *extra]


def stub_grid_training(monkeypatch, accuracy, key="loss.terms.ot.weight"):
  """loop.train_and_evaluate replaced (no training: the weight-grid tests of
  runs.tune, sweep and curve): a run's validation accuracy is
  ``accuracy(its config's key)`` + seed / 1000; returns the list of
  (weight, seed) trained."""
  trained = []

  def train(config, workdir, *, strict):
    del strict
    w = config
    for part in key.split("."):
      w = w[part]
    trained.append((w, config.seed))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, loop.ANALYSIS), "w") as f:
      json.dump({"layers": [], "matched_fraction": [], "row_max_mass": [],
                 "plan_entropy": []}, f)
    return {"test_accuracy_at_best_val": 0.5, "test_accuracy": 0.5,
            "best_val_accuracy": accuracy(w) + config.seed / 1000,
            "best_step": 10, "step": 20}

  monkeypatch.setattr(loop, "train_and_evaluate", train)
  return trained
