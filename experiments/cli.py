"""Process set-up shared by the command-line entry points (no flags here)."""

import contextlib
import logging as std_logging
import os
import re
import signal
import sys

from absl import logging

from experiments import interrupts
from experiments.interrupts import resume_command  # noqa: F401 (re-exported)


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when a coordinator is configured.

  Set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, then start the same command in every process.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    import jax
    # Cross-process collectives for CPU devices (GPUs/TPUs bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))


# Our packages: their INFO lines (progress, headers) are the run's log.
_OURS = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in (
    __file__, os.path.join(os.path.dirname(__file__), "..", "ot_transfer_jax",
                           "__init__.py")))


def quiet_libraries() -> None:
  """INFO logs for our own lines (progress, headers, evaluations), only
  warnings and errors from libraries: orbax's per-save INFO lines and jax's
  backend probing ("Unable to initialize backend 'tpu'", INFO, on every
  machine without a TPU) would read like errors. JAX's warnings (e.g. a GPU
  present but no CUDA jaxlib) still show."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= std_logging.WARNING
      or os.path.abspath(r.pathname).startswith(_OURS))


def config_name(path: str) -> str:
  """``digits_transfer`` for ``.../transfer.py:data=digits,method=ot``: the
  file's name after ARG's values other than the method, a true flag by its
  key (``data=digits,smoke=True``: ``digits_smoke_transfer``, so that a smoke
  run never resumes into a real run's workdir) and a false one left out; the
  default workdirs of the tools are named by it."""
  path, _, arg = path.partition(":")
  values = []
  for part in arg.split(","):
    key, eq, value = part.partition("=")
    if not eq or key == "method" or value in ("False", "false", "0", ""):
      continue
    values.append(key if value in ("True", "true", "1") else value)
  return "_".join([*values, os.path.splitext(os.path.basename(path))[0]])


def default_workdir(config_path: str, method: str) -> str:
  """``experiments.main``'s default --workdir: ``workdirs/main/digits_transfer/ot``
  for ``transfer.py:data=digits`` (its default method, ``ot``)."""
  return os.path.join(default_root("main", config_path), method or "default")


def default_root(tool: str, config_path: str) -> str:
  """``workdirs/<tool>/<config name>``: the default --workdir of
  ``reproduce``, ``sweep`` and ``curve`` (``main``'s adds the method), so no
  tool's default writes inside another's."""
  return os.path.join("workdirs", tool, config_name(config_path))


def parse_flags(argv):
  """absl's flag parsing, with a one-paragraph error for a bad config override.

  ml_collections reports an unknown ``--config.key`` with a stack trace; the
  user needs the key, the nearest existing one and how to list them.
  """
  from absl import flags
  _check_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if "Traceback (most recent call last)" in str(e):
      # get_config raised (e.g. an unknown file.py:METHOD): its last line.
      lines = [l for l in str(e).splitlines()
               if re.match(r"^\w+(Error|Exception): ", l)]
      sys.stderr.write(f"Error: {lines[-1].split(': ', 1)[1] if lines else e}\n")
      sys.exit(2)
    if "--config." not in str(e):  # A plain flag: absl's message says it.
      sys.stderr.write(f"Error: {e}\nRun with --help for the flags.\n")
      sys.exit(2)
    _bad_override(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _bad_override(e)


def _bad_override(e: Exception) -> None:
  """One paragraph for an unknown or mistyped ``--config.key=value``."""
  # ml_collections nests a repr in its message: unescape, one line.
  message = str(e).encode().decode("unicode_escape")
  if message.startswith("'"):
    message = re.sub(r"^'+|'+$", "", message)
  message = " ".join(message.split())
  message = re.sub(r"^'?(\w+)'", r"'\1'", message)
  end = "" if message.endswith((".", "?")) else "."
  sys.stderr.write(
      f"Error: bad --config override: {message}{end} Every key must exist in "
      "the config file's get_config() (see its docstring, or "
      "experiments/configs/common.py for the full list with defaults; a "
      "method's terms are under loss.terms.<name>); values must have the "
      "key's type.\n")
  sys.exit(2)


def _check_config_file(argv) -> None:
  """One ``Error:`` line for a ``--config`` file that does not exist
  (ml_collections would fail on the first ``--config.key`` with a trace)."""
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    else:
      continue
    path = path.split(":", 1)[0]
    if not os.path.isfile(path):
      _exit_error(f"--config {path}: no such file. Pass an experiment "
                  "config, e.g. experiments/configs/transfer.py"
                  "[:data=digits,method=ot] (relative to the current "
                  "directory).")


def check_paths(workdir: str) -> None:
  """Exits with one ``Error:`` line for a ``--workdir`` that exists but is
  not a directory (before any work)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    _exit_error(f"--workdir {workdir} is a file, not a directory. Pass a "
                "directory (created if missing) for the checkpoints and "
                "outputs.")


def _exit_error(message: str, code: int = 1) -> None:
  sys.stderr.write(f"Error: {message}\n")
  sys.exit(code)


@contextlib.contextmanager
def user_errors():
  """The errors a user can fix, as one message on stderr, not a traceback.

  Bad input (ValueError and its kin: unknown layer, shapes, dataset not
  prepared, damaged checkpoint; OSError: an unreadable or unwritable path)
  and a diverged run exit with status 1. A preempted run (checkpoint saved)
  exits with 143 after SIGTERM and 130 after SIGINT (Ctrl-C), printing where
  the checkpoint is and the command that resumes; a signal anywhere else
  (start-up, data, compilation, analysis) exits the same way, saying that no
  checkpoint was written (:mod:`experiments.interrupts`).
  """
  from experiments.loop import Diverged, Preempted
  try:
    yield
    interrupts.check()  # A signal whose exception something swallowed.
  except Preempted as e:
    interrupts.exit_now(f"{e} Resume: {resume_command()}", e.exit_code)
  except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM outside the loop.
    signum = getattr(e, "signum", signal.SIGINT)
    interrupts.exit_now(interrupts.interrupted_message(signum),
                        128 + int(signum))
  except (ValueError, OSError, Diverged) as e:
    _exit_error(str(e))
