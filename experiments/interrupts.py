"""Ctrl-C (SIGINT) and SIGTERM, from an entry point's first line to its exit.

An entry point (``python -m experiments.main``, ``reproduce``, ``sweep``,
``curve``) calls :func:`install` before its other imports. From then on a
signal ends the process with exit status 128 + the signal's number (130 for
SIGINT, 143 for SIGTERM) and one line on stderr saying what happened and the
command that resumes, whatever the process is doing:

* **In the training loop** (:func:`deferred`, entered by
  :func:`experiments.loop.train_and_evaluate`): the signal only sets a flag;
  the loop finishes its step, saves a checkpoint and raises
  ``loop.Preempted`` ("Stopped by SIGINT at step N; checkpoint saved in
  ..."). A second SIGINT exits at once, without that checkpoint (the last one
  is still a clean resume point).
* **Anywhere else** (imports, flag parsing, data loading, compilation,
  restoring, the analysis after training): the handler raises
  :class:`Interrupted` (a ``KeyboardInterrupt``), so ``finally`` blocks run
  (the workdir lock is released, an empty workdir this run created is
  removed), and the entry point reports it ("Interrupted by SIGINT (no
  checkpoint written since the last one). Resume: ...").

Why it is built this way (each point a failure seen with the default
handlers, sending SIGINT 0.3-16 s after start):

* Python's own handler raises ``KeyboardInterrupt`` wherever the main thread
  is, including inside ``gc`` callbacks and ``__del__`` methods, where the
  exception is printed as "Exception ignored" and lost: one run trained to
  the end (jax's ``_xla_gc_callback``). Here every signal is also recorded
  (:func:`pending`), and :func:`check` (called between phases and before
  the entry point returns) raises a recorded one that was swallowed.
* A per-loop handler forgot a signal received in the teacher's last step:
  the student then trained to the end. The record here lives as long as the
  process.
* ``sys.exit`` after the message ran the interpreter's shutdown while XLA,
  orbax and grain threads were still running: "Fatal Python error:
  Segmentation fault" (exit -11) in 5 of 17 runs. :func:`exit_now` flushes
  the output and ends the process with ``os._exit``, which runs no shutdown
  (checkpoints are written synchronously and renamed into place, metric
  lines are flushed as written: nothing is lost).
* A signal before the handlers exist (the first few milliseconds of the
  interpreter) keeps Python's default behaviour: :func:`install` runs before
  any other import of the entry point, so that window is the interpreter's
  own start-up.

A second signal while an interrupted process is unwinding exits at once.
Library users calling ``loop.train_and_evaluate`` from their own Python
process (tests, notebooks) never call :func:`install`: there
:func:`deferred` installs the flag handler for the loop only and restores the
previous handlers afterwards, as a library should.

Only the standard library is imported here, so installing costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM outside the training loop; ``signum`` says which."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + int(self.signum)


class _State:
  installed = False     # install() ran: this process is an entry point.
  signum: Optional[int] = None  # The first signal received (sticky).
  unwinding = False     # An Interrupted was raised: the next signal exits.
  deferring = 0         # > 0 inside deferred(): signals only set the flag.


def _warn(message: str) -> None:
  """A warning through absl when it is loaded (the run's log format)."""
  absl_logging = sys.modules.get("absl.logging")
  if absl_logging is not None:
    absl_logging.warning("%s", message)
  else:
    sys.stderr.write(message + "\n")


def _handle(signum, frame) -> None:
  del frame
  name = signal.Signals(signum).name
  if _State.deferring:
    if _State.signum is not None and signum == signal.SIGINT:
      if not _State.installed:  # A library user's process: never end it.
        raise KeyboardInterrupt
      exit_now(interrupted_message(signum),
               128 + int(signum))  # Second Ctrl-C: at once.
    if _State.signum is None:
      _State.signum = signum
    _warn(f"{name}: saving a checkpoint before exiting"
          + (" (Ctrl-C again: exit now, without it)."
             if signum == signal.SIGINT else "."))
    return
  if _State.unwinding:  # Already on its way out; do not wait for it.
    exit_now(interrupted_message(_State.signum or signum),
             128 + int(_State.signum or signum))
  if _State.signum is None:
    _State.signum = signum
  _State.unwinding = True
  raise Interrupted(_State.signum)


def install() -> None:
  """Handles SIGINT and SIGTERM for the rest of this process (main thread).

  Also sets ``sys.excepthook`` so that an :class:`Interrupted` nothing caught
  (e.g. raised while a module was being imported) ends the process with the
  message and exit status, not a traceback, and ``sys.unraisablehook`` so that
  one raised where Python can only print it (a ``gc`` callback, ``__del__``)
  prints nothing: :func:`check` raises it again.
  """
  if threading.current_thread() is not threading.main_thread():
    return
  for signum in SIGNALS:
    signal.signal(signum, _handle)
  previous_hook = sys.excepthook

  def excepthook(kind, value, traceback):
    # After a signal, whatever ends the process is its consequence: the
    # Interrupted itself, or what a C extension made of it (raised while
    # jaxlib initialises, it surfaces as "ImportError: Encountered an error
    # while initializing the extension").
    if isinstance(value, KeyboardInterrupt) or _State.signum is not None:
      signum = getattr(value, "signum", None) or _State.signum or (
          signal.SIGINT)
      exit_now(interrupted_message(signum), 128 + int(signum))
    previous_hook(kind, value, traceback)

  sys.excepthook = excepthook
  previous_unraisable = sys.unraisablehook

  def unraisablehook(info):
    # Raised inside a gc callback or __del__, where Python only prints it:
    # recorded already, and check() raises it again; no traceback.
    if not isinstance(info.exc_value, Interrupted):
      previous_unraisable(info)

  sys.unraisablehook = unraisablehook
  _State.installed = True


def pending() -> Optional[int]:
  """The signal received so far, or None."""
  return _State.signum


def check() -> None:
  """Raises :class:`Interrupted` for a signal that was received but whose
  exception was swallowed (e.g. raised inside a ``gc`` callback)."""
  if _State.installed and _State.signum is not None:
    _State.unwinding = True
    raise Interrupted(_State.signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Inside: a signal only sets the flag (:func:`pending`), which the
  training loop polls between steps to checkpoint and stop. Outside an entry
  point (no :func:`install`), installs the flag handler for the block only
  and forgets the flag after it."""
  previous = {}
  if not _State.installed:
    for signum in SIGNALS:
      try:
        previous[signum] = signal.signal(signum, _handle)
      except ValueError:  # Not the main thread: no handler, no flag.
        pass
  _State.deferring += 1
  try:
    yield
  finally:
    # The previous handlers first: a signal in between must not find the
    # loop's flag handler with the loop gone.
    if not _State.installed:
      for signum, handler in previous.items():
        signal.signal(signum, handler)
    _State.deferring -= 1
    if not _State.installed:
      _State.signum = None
      _State.unwinding = False


def resume_command() -> str:
  """The command line of this process, to rerun it (it resumes): ``python -m
  experiments.<module>`` for the entry point that runs (main, reproduce,
  sweep, curve)."""
  stem = os.path.splitext(os.path.basename(sys.argv[0]))[0]
  module = stem if stem in ("reproduce", "sweep", "curve") else "main"
  return shlex.join(["python", "-m", f"experiments.{module}", *sys.argv[1:]])


def interrupted_message(signum: int) -> str:
  """The line for a signal that ended the run without a new checkpoint."""
  return (f"Interrupted by {signal.Signals(signum).name} (no checkpoint "
          f"written since the last one). Resume: {resume_command()}")


def exit_now(message: str, code: int) -> None:
  """Writes ``message`` to stderr and ends the process with ``code``, running
  no interpreter shutdown (see the module docstring)."""
  with contextlib.suppress(Exception):
    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:
      absl_logging.flush()
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  with contextlib.suppress(Exception):
    os.write(2, (message + "\n").encode())
  os._exit(code)
