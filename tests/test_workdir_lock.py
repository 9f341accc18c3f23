"""One run per workdir (experiments/workdir_lock.py), with real processes."""

import json
import os
import socket
import subprocess
import sys

import pytest

from experiments import workdir_lock

from digits_job import REPO

HOLDER = """
import sys
from experiments import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print("held", flush=True)
  sys.stdin.read()  # Until the test closes stdin (or kills us).
"""


def _env():
  # The checkout under test, not an installed copy.
  return {**os.environ, "PYTHONPATH": os.pathsep.join(
      [REPO, os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu"}


def _holder(workdir):
  """A second real process holding ``workdir``'s lock."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)],
                          cwd=REPO, env=_env(), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def _main(workdir, *extra):
  """``python -m experiments.main`` on a config that stops in its data check
  (no training: the lock is taken before it)."""
  return subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config",
       "experiments/configs/transfer.py:data=digits,method=ot",
       f"--workdir={workdir}",
       f"--config.teacher.workdir={workdir}/teacher", *extra],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _errors(stderr):
  return [line for line in stderr.splitlines() if line.startswith("Error:")]


@pytest.mark.slow
def test_second_run_stops_naming_the_live_holder_then_takes_over_a_dead_one(
    tmp_path):
  workdir = tmp_path / "run"
  holder = _holder(workdir)
  try:
    proc = _main(workdir)
  finally:
    holder.kill()  # SIGKILL: the lock file keeps the dead holder's name.
    holder.wait()
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = _errors(proc.stderr)
  assert len(errors) == 1, proc.stderr[-3000:]
  assert proc.stderr.rstrip().endswith(errors[0])
  started = json.loads((workdir / ".lock").read_text())["started"]
  assert (f"is in use by another run: pid {holder.pid} on host "
          f"{socket.gethostname()}, started {started}") in errors[0]
  assert f"kill {holder.pid}" in errors[0] and "another --workdir" in errors[0]

  # The holder is dead: the next run takes the lock over, says so, and goes
  # on (here to its data check, which stops it with its own one line).
  proc = _main(workdir, "--config.data.name=cifar1000")
  assert proc.returncode == 1, proc.stderr[-3000:]
  warnings = [line for line in proc.stderr.splitlines()
              if "Taking over" in line]
  assert len(warnings) == 1, proc.stderr[-3000:]
  assert f"from pid {holder.pid} on host {socket.gethostname()}" in \
      warnings[0] and "no longer running" in warnings[0]
  assert "not a known dataset" in _errors(proc.stderr)[0]
  assert (workdir / ".lock").read_text() == ""  # Released on exit.


def test_lock_left_by_another_host_is_refused_with_the_fix(tmp_path):
  (tmp_path / ".lock").write_text(json.dumps(
      {"pid": 4242, "host": "elsewhere", "started": "2026-01-01 00:00:00 UTC",
       "command": "python -m experiments.main"}))
  with pytest.raises(workdir_lock.WorkdirLocked) as err:
    with workdir_lock.hold(str(tmp_path)):
      pass
  message = str(err.value)
  assert "pid 4242 on host elsewhere, started 2026-01-01 00:00:00 UTC" in \
      message and f"delete {tmp_path / '.lock'}" in message


def test_released_lock_is_free_without_warning(tmp_path, caplog):
  for _ in range(2):
    with workdir_lock.hold(str(tmp_path)):
      holder = json.loads((tmp_path / ".lock").read_text())
      assert holder["pid"] == os.getpid()
    assert (tmp_path / ".lock").read_text() == ""
  assert "Taking over" not in caplog.text


def test_a_failure_before_any_output_removes_the_workdir_it_created(
    tmp_path):
  for existed in (False, True):
    workdir = tmp_path / f"run_{existed}"
    if existed:
      workdir.mkdir()
    with pytest.raises(ValueError, match="bad config"):
      with workdir_lock.hold(str(workdir)):
        (workdir / "teacher").mkdir()  # Empty folders do not count.
        raise ValueError("bad config")
    assert workdir.exists() == existed
  # Output written: kept, whatever failed afterwards.
  workdir = tmp_path / "run_with_output"
  with pytest.raises(ValueError):
    with workdir_lock.hold(str(workdir)):
      (workdir / "metrics.jsonl").write_text("{}")
      raise ValueError("diverged")
  assert (workdir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_run_stopped_by_validation_leaves_no_workdir(tmp_path):
  workdir = tmp_path / "new_run"
  proc = _main(workdir, "--config.data.name=cifar1000")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "not a known dataset" in _errors(proc.stderr)[0]
  assert not workdir.exists()
  # A workdir that existed before is the user's: kept, lock released.
  workdir.mkdir()
  proc = _main(workdir, "--config.data.name=cifar1000")
  assert proc.returncode == 1 and workdir.is_dir()
  assert (workdir / ".lock").read_text() == ""
