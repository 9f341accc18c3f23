"""A tiny digits transfer job (transfer.py:data=digits) shared by the end-to-end tests."""

import os
import sys

from experiments.configs import transfer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"num_steps": 20, "eval_every": 10, "log_every": 5,
        "checkpoint_every": 10}
TEACHER_STEPS = 40


def tiny_config(teacher_dir, method="ot", **overrides):
  c = transfer.get_config(f"data=digits,method={method}")
  c.update({**TINY, **overrides})
  c.teacher.job.num_steps = TEACHER_STEPS
  c.teacher.workdir = str(teacher_dir)
  return c


def cli_overrides(teacher_dir, **overrides):
  flags = {**TINY, "teacher.job.num_steps": TEACHER_STEPS,
           "teacher.workdir": str(teacher_dir), **overrides}
  return [f"--config.{k}={v}" for k, v in flags.items()]


def main_command(workdir, teacher_dir, *extra, method="ot"):
  """``python -m experiments.main`` on the tiny digits transfer config."""
  return [sys.executable, "-m", "experiments.main", "--config",
          os.path.join(REPO, "experiments/configs/transfer.py:"
                       f"data=digits,method={method}"),
          f"--workdir={workdir}", *cli_overrides(teacher_dir), *extra]
