"""Train and evaluate one experiment config.

  python -m experiments.main \
      --config experiments/configs/transfer.py[:data=digits,method=ot] \
      [--workdir workdirs/main/digits_transfer/ot] [--config.num_steps=100 ...]

``file.py:ARG`` is passed to the file's ``get_config``: a method
(``file.py:ot``), or ``key=value`` pairs for configs that take arguments
(``transfer.py:data=fashion_mnist,method=ot``); without it, the config's
defaults. ``--config.key=value`` overrides are applied after it. The default
--workdir is ``workdirs/main/<config name>/<method>`` (:func:`cli.default_workdir`;
``reproduce``, ``sweep`` and ``curve`` default to ``workdirs/<tool>/<config
name>``, so no tool writes into another's runs). Rerunning the same command
resumes from the last checkpoint in --workdir. Ctrl-C or SIGTERM at any moment
ends with exit status 130 or 143 and one line saying how to resume
(:mod:`experiments.interrupts`). Multi-host: set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID and run this same command in every
process.

The last lines printed (stdout): where each output is, then the test accuracy
at the best validation step (what the results tables report) and at the last
step.
"""

from experiments import interrupts

if __name__ == "__main__":  # A command (not an import): from its first line,
  interrupts.install()  # Ctrl-C / SIGTERM end in one line (imports included).

# pylint: disable=g-import-not-at-top,wrong-import-position
import os  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import loop  # noqa: E402
from experiments.cli import (check_paths, default_workdir,  # noqa: E402
                             maybe_initialize_distributed, parse_flags,
                             quiet_libraries, user_errors)
from experiments.metric_writers import METRICS_FILE, TENSORBOARD_DIR  # noqa: E402
from ot_transfer_jax import checkpoint  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiment config (get_config(arg)), "
    "optionally followed by :ARG (a method, or key=value,... pairs).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and outputs (default: "
    "workdirs/main/<config name>/<method>).")
flags.mark_flags_as_required(["config"])


def outputs(workdir: str, final: dict) -> str:
  """The closing lines: where each output of the run is, then the test
  accuracy at the best validation step and at the last step."""
  teacher = _CONFIG.value.teacher
  lines = [f"Outputs in {workdir}:",
           f"  {loop.FINAL_METRICS:<19} the numbers below, the best step",
           f"  {METRICS_FILE:<19} every logged step (JSON lines)",
           f"  {TENSORBOARD_DIR + '/':<19} tensorboard --logdir "
           f"{os.path.join(workdir, TENSORBOARD_DIR)}",
           f"  {checkpoint.CHECKPOINT_DIR + '/':<19} "
           "ot_transfer_jax.checkpoint.restore(WORKDIR) -> predict "
           "(docs/experiments.md)",
           f"  {loop.ANALYSIS:<19} OT plans between student and teacher "
           "layers"]
  if teacher.source == "train":
    lines.append(f"  {'teacher:':<19} "
                 f"{loop.job_lib.teacher_workdir(_CONFIG.value, workdir)}")
  best, last = final["test_accuracy_at_best_val"], final["test_accuracy"]
  run = f"{final['method'] or 'run'}, seed {final['seed']}"
  if best is None:  # No validation split: nothing was selected.
    lines.append(f"{run}: test accuracy {last:.4f} at the last step "
                 f"{final['step']} (no validation split: no step selected)")
  else:
    lines.append(
        f"{run}: test accuracy {best:.4f} at the best validation step "
        f"{final['best_step']} (val accuracy {final['best_val_accuracy']:.4f})"
        f"; at the last step ({final['step']}): {last:.4f}")
  return "\n".join(lines)


def main(argv):
  del argv
  workdir = _WORKDIR.value or default_workdir(
      flags.FLAGS["config"].config_filename, _CONFIG.value.method)
  check_paths(workdir)
  maybe_initialize_distributed()
  quiet_libraries()
  with user_errors():
    final = loop.train_and_evaluate(_CONFIG.value, workdir)
  print(outputs(workdir, final))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
