"""The digits transfer job at smoke sizes (transfer.py:data=digits,smoke=True), shared by the end-to-end tests."""

import os
import sys

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
