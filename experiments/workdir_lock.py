"""One run per workdir: a lock file held for the whole run.

Two processes training in one ``--workdir`` would write every metrics row
twice and interleave checkpoints. :func:`hold` takes ``WORKDIR/.lock`` with
``fcntl.flock`` (released by the kernel when the holder dies, however it
dies) and writes the holder's pid, host, start time and command into it, so
that a second process can stop at once with one line naming them.

* A live holder: :class:`WorkdirLocked` (an ``OSError``: the command line
  prints it as one ``Error:`` line).
* A file left by a holder that died on this host (SIGKILL, power loss): the
  lock is free, so it is taken over with a warning naming the dead holder.
* A file left by a holder on another host (a shared filesystem, where flock
  may not reach across hosts): refused, saying how to release it by hand.

A clean exit (or an error, or SIGTERM / SIGINT) empties the file; it is never
deleted while held, so two processes cannot lock two different files. A run
that fails before writing anything in a workdir it created (a config or data
error) removes that workdir again: no empty run directory is left behind.
With several processes (multi-host), process 0 holds the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
from typing import Iterator, Optional

import jax
from absl import logging

LOCK_FILE = ".lock"


class WorkdirLocked(OSError):
  """Another run holds the workdir; the message names it and what to do."""


def _holder() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).strftime(
              "%Y-%m-%d %H:%M:%S UTC"),
          "command": shlex.join([os.path.basename(sys.executable),
                                 *sys.argv])}


def _read(fd: int) -> Optional[dict]:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 1 << 16).decode(errors="replace")
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  return holder if isinstance(holder, dict) else None


def _describe(holder: Optional[dict]) -> str:
  if not holder:
    return "a process that has not written its name yet"
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
          f"{holder.get('started')}")


def _remove_if_unused(workdir: str) -> None:
  """Deletes ``workdir`` if it holds no file but the lock (empty folders
  aside): what a run that failed before doing anything leaves."""
  for root, _, files in os.walk(workdir):
    if any(not (root == workdir and f == LOCK_FILE) for f in files):
      return
  shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds ``WORKDIR/.lock`` while the body runs (creating ``workdir``).

  Raises:
    WorkdirLocked: a live process holds it, or a process on another host
      left it.
  """
  if jax.process_index() != 0:
    yield
    return
  created = not os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      pid = holder.get("pid", "PID") if holder else "PID"
      raise WorkdirLocked(
          f"--workdir {workdir} is in use by another run: {_describe(holder)}"
          f"{'' if not holder else ' (' + str(holder.get('command')) + ')'}. "
          f"Wait for it to finish, stop it (kill {pid}: it saves a "
          "checkpoint and the same command resumes), or pass another "
          "--workdir.") from None
    me = _holder()
    previous = _read(fd)
    if previous:
      if previous.get("host") != me["host"]:
        raise WorkdirLocked(
            f"--workdir {workdir} was locked by {_describe(previous)}, which "
            "this host cannot check. If that run has stopped, delete "
            f"{path} and rerun; otherwise wait for it or pass another "
            "--workdir.")
      logging.warning(
          "Taking over %s from %s, which is no longer running (killed?); "
          "resuming from its last checkpoint.", path, _describe(previous))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    failed = False
    try:
      yield
    except BaseException:
      failed = True
      raise
    finally:
      os.ftruncate(fd, 0)  # Released cleanly: nothing stale left.
      if failed and created:
        _remove_if_unused(workdir)
  finally:
    os.close(fd)  # Releases the flock.
