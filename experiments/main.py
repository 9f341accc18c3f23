"""Train and evaluate one experiment config.

  python -m experiments.main \
      --config experiments/configs/transfer.py[:data=digits,method=ot] \
      --workdir workdirs/digits_transfer/ot [--config.num_steps=100 ...]

``file.py:ARG`` is passed to the file's ``get_config``: a method
(``file.py:ot``), or ``key=value`` pairs for configs that take arguments
(``transfer.py:data=fashion_mnist,method=ot``); without it, the config's
defaults. ``--config.key=value`` overrides are applied after it. Rerunning the same
command resumes from the last checkpoint in --workdir. Multi-host: set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID and run this
same command in every process.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import loop
from experiments.cli import (check_paths, maybe_initialize_distributed,
                             parse_flags, quiet_orbax, user_errors)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiment config (get_config(arg)), "
    "optionally followed by :ARG (a method, or key=value,... pairs).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  check_paths(_WORKDIR.value)
  maybe_initialize_distributed()
  quiet_orbax()
  with user_errors():
    final = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print({k: final[k] for k in ("method", "step", "val_accuracy",
                               "test_accuracy")})


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
