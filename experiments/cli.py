"""Process set-up shared by the command-line entry points (no flags here)."""

import contextlib
import logging as std_logging
import os
import re
import sys

from absl import logging


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


def quiet_orbax() -> None:
  """INFO logs for our progress lines, but only warnings from orbax."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)


def parse_flags(argv):
  """absl's flag parsing, with a one-paragraph error for a bad config override.

  ml_collections reports an unknown ``--config.key`` with a stack trace; the
  user needs the key, the nearest existing one and how to list them.
  """
  from absl import flags
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
  sys.stderr.write(
      f"Error: bad --config override: {message}. Every key must exist in "
      "the config file's get_config() (see its docstring, or "
      "experiments/configs/common.py for the full list with defaults; a method's terms are under loss.terms.<name>); "
      "values must have the key's type.\n")
  sys.exit(2)


@contextlib.contextmanager
def user_errors():
  """The errors a user can fix, as one message on stderr, not a traceback.

  Bad input (ValueError and its kin: unknown layer, shapes, dataset not
  prepared, damaged checkpoint) and a diverged run exit with status 1;
  a preempted run (SIGTERM, checkpoint saved) with 143.
  """
  from experiments.loop import Diverged, Preempted
  try:
    yield
  except Preempted as e:
    sys.stderr.write(f"{e}\n")
    sys.exit(143)
  except (ValueError, FileNotFoundError, Diverged) as e:
    sys.stderr.write(f"Error: {e}\n")
    sys.exit(1)
