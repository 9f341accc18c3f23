"""Ctrl-C and SIGTERM at every moment of ``python -m experiments.main``: one
line, the shell's exit status, never a crash or an ignored signal
(experiments/interrupts.py). Real processes, signals from Popen."""

import os
import signal
import subprocess
import sys
import time

import pytest

from digits_job import REPO, main_command

ENV = dict(os.environ, PYTHONUNBUFFERED="1")
_SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def _handlers_installed(pid: int) -> bool:
  """Whether the process catches SIGTERM (Python alone does not: only
  experiments.interrupts.install() does), from /proc/PID/status."""
  with open(f"/proc/{pid}/status") as f:
    caught = next(l for l in f if l.startswith("SigCgt:")).split()[1]
  return bool(int(caught, 16) & _SIGTERM_BIT)


def _interrupt(tmp_path, name, sig, *, after_install=None, on_line=None,
               teacher=None):
  """Starts the tiny digits job (its teacher trains first, unless
  ``teacher`` is a trained one), sends ``sig`` ``after_install`` seconds
  after the signal handlers exist, or as soon as stderr shows ``on_line``;
  returns (exit status, stderr)."""
  workdir = tmp_path / name / "run"
  teacher = teacher or tmp_path / name / "teacher"
  proc = subprocess.Popen(main_command(workdir, teacher), cwd=REPO, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  seen = []
  try:
    if on_line is None:
      deadline = time.time() + 60
      while not _handlers_installed(proc.pid):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
      time.sleep(after_install)
    else:
      for line in proc.stderr:
        seen.append(line)
        if on_line in line:
          break
      else:
        pytest.fail(f"{name}: the run ended without logging {on_line!r}")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, "".join(seen) + err, out


@pytest.mark.slow
def test_a_signal_at_any_moment_ends_with_one_line_and_its_exit_status(
    tmp_path, teacher_dir):
  """Before any other import, during the imports, jax's start-up and the
  config, the teacher's set-up, its loop (SIGTERM), between the teacher and
  the student, and at the student's last step (a signal there used to be
  forgotten: the run ended with status 0; the session's trained teacher
  there, the cases before train one)."""
  cases = [  # name, signal, when
      ("first_line", signal.SIGINT, dict(after_install=0.0)),
      ("imports", signal.SIGINT, dict(after_install=0.3)),
      ("start_up", signal.SIGINT, dict(after_install=1.0)),
      ("config", signal.SIGINT, dict(after_install=2.0)),
      ("teacher_loop", signal.SIGTERM, dict(on_line="step 25/40")),
      ("student_set_up", signal.SIGINT,
       dict(on_line="Final metrics of the teacher")),
      ("last_step", signal.SIGINT, dict(on_line="step 20/20 (100.0%)",
                                        teacher=teacher_dir)),
  ]
  for name, sig, when in cases:
    code, err, out = _interrupt(tmp_path, name, sig, **when)
    tail = f"{name}: exit {code}\n{err[-3000:]}"
    assert code == 128 + sig, tail
    # In the loop: a checkpoint, then this line; elsewhere: no checkpoint.
    lines = [l for l in err.splitlines() if
             f"Stopped by {sig.name} at step" in l and "checkpoint saved" in l
             or f"Interrupted by {sig.name} (no checkpoint written" in l]
    assert len(lines) == 1, tail
    assert "Resume: python -m experiments.main --config" in lines[0], tail
    for noise in ("Traceback", "Fatal Python error", "Exception ignored"):
      assert noise not in err, tail
    assert "test accuracy" not in out  # It never finished.
  # Stopped at the last step: the rerun finishes without training.
  proc = subprocess.run(main_command(tmp_path / "last_step" / "run",
                                     teacher_dir),
                        cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resuming the student" in proc.stderr
  assert "test accuracy" in proc.stdout.splitlines()[-1]


def test_library_use_a_second_ctrl_c_raises_and_the_process_lives():
  # Without install() (a notebook, a test), the loop's handler never ends the
  # process: the second SIGINT is an ordinary KeyboardInterrupt, and the
  # caller's handlers and a clean state come back afterwards.
  from experiments import interrupts
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    with interrupts.deferred():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
      assert interrupts.pending() == signal.SIGINT  # Only the flag.
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
  assert signal.getsignal(signal.SIGINT) is before
  assert interrupts.pending() is None


def test_an_error_that_a_signal_caused_ends_as_the_signal():
  # A SIGINT inside a C extension's initialisation (jaxlib) surfaces as an
  # ImportError: the process must still end as interrupted, with its line.
  code = ("import os, signal, time\n"
          "from experiments import interrupts\n"
          "interrupts.install()\n"
          "try:\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n"
          "  time.sleep(1)\n"
          "except KeyboardInterrupt:\n"
          "  pass  # What the extension's initialisation did with it.\n"
          "raise ImportError('Encountered an error while initializing the "
          "extension.')\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 128 + signal.SIGINT, proc.stderr
  assert proc.stderr.count("Interrupted by SIGINT") == 1
  assert "Traceback" not in proc.stderr and "ImportError" not in proc.stderr
