"""Faults: preemption at any moment, non-finite steps, damaged or foreign
checkpoints, crafted checkpoints, and two processes forming one mesh."""

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from experiments import loop
from ot_transfer_jax import checkpoint, inference

from digits_job import REPO, config_flags, main_command, tiny_config

LONG_CONFIG = {"num_steps": 60, "checkpoint_every": 20, "log_every": 2}
LONG = config_flags(LONG_CONFIG)
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _final(workdir):
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    return json.load(f)


def _params(workdir):
  return jax.device_get(inference.restore(str(workdir)).variables)


def _assert_same_params(a, b, rtol):
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol), a,
      b)


def _wait_for(proc, condition, what, timeout=240):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"the run ended before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.02)


def _logged_step(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
  return max(steps, default=0)


@pytest.mark.slow
def test_interrupted_runs_end_like_an_uninterrupted_one(teacher_dir,
                                                        tmp_path):
  """kill -9 before the first checkpoint, and past one mid-write (steps
  logged after it, a half-written step left on disk); SIGTERM and SIGINT
  (Ctrl-C) mid-run. Each rerun ends with the parameters, metrics and metric
  rows of the uninterrupted run."""
  run = lambda wd: subprocess.run(main_command(wd, teacher_dir, *LONG),
                                  cwd=REPO, env=ENV, check=True,
                                  capture_output=True, timeout=300)
  # The uninterrupted run, here: the job the command runs (a process of its
  # own would import, load and trace it all again: ~10 s).
  straight = tmp_path / "straight"
  loop.train_and_evaluate(tiny_config(teacher_dir, **LONG_CONFIG),
                          str(straight))

  def interrupt(workdir, condition, what, sig=signal.SIGKILL):
    proc = subprocess.Popen(main_command(workdir, teacher_dir, *LONG),
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(proc, condition, what)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert not (workdir / "final_metrics.json").exists()
    return proc.returncode, err

  ckpt = lambda wd, step: (wd / "checkpoints" / str(step)).is_dir()

  early = tmp_path / "early"  # Logged steps, no checkpoint yet.
  interrupt(early, lambda: 4 <= _logged_step(early), "step 4")
  assert not ckpt(early, 20)

  mid_write = tmp_path / "mid_write"
  interrupt(mid_write, lambda: ckpt(mid_write, 20) and
            _logged_step(mid_write) >= 30, "step 30")
  # What SIGKILL during orbax's write leaves: an unfinished temporary step.
  partial = mid_write / "checkpoints" / "40.orbax-checkpoint-tmp-1234"
  shutil.copytree(mid_write / "checkpoints" / "20", partial)
  for f in partial.rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])

  resumable = {}
  for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
    # SIGINT from Python's Popen: a background job of a non-interactive
    # shell would ignore it.
    workdir = tmp_path / sig.name
    returncode, err = interrupt(workdir, lambda: _logged_step(workdir) >= 26,
                                "step 26", sig=sig)
    lines = [line for line in err.splitlines() if "Stopped by" in line]
    assert returncode == code and len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"Stopped by {sig.name} at step" in lines[0]
    assert f"saved in {workdir / 'checkpoints'}" in lines[0]
    assert "Resume: python -m experiments.main" in lines[0]
    saved = checkpoint.make_manager(str(workdir), reading=True).latest_step()
    assert saved is not None and saved % 20 != 0  # Saved on the signal.
    resumable[sig.name] = workdir

  for workdir in (early, mid_write, *resumable.values()):
    run(workdir)
    # The same run: the config the command's flags built is the one above.
    assert (inference.restore(str(workdir)).config ==
            inference.restore(str(straight)).config), workdir.name
    assert _final(workdir) == _final(straight), workdir.name
    _assert_same_params(_params(workdir), _params(straight), rtol=1e-6)
    # Steps logged past the last checkpoint were dropped on resume.
    with open(workdir / "metrics.jsonl") as f:
      rows = [(r["split"], r["step"]) for r in map(json.loads, f)]
    assert len(rows) == len(set(rows)), workdir.name
    with open(straight / "metrics.jsonl") as f:
      assert rows == [(r["split"], r["step"]) for r in map(json.loads, f)]


@pytest.mark.slow
def test_non_finite_steps_stop_the_run_and_keep_good_checkpoints(
    teacher_dir, tmp_path):
  config = tiny_config(teacher_dir, num_steps=40, log_every=1,
                       checkpoint_every=2)
  config.optimizer.learning_rate = 1e30
  config.optimizer.grad_clip_norm = 0.0
  config.loss.max_bad_steps = 3
  with pytest.raises(loop.Diverged,
                     match="consecutive training steps had a non-finite"):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "final_metrics.json").exists()
  restored = inference.restore(str(tmp_path))
  for leaf in jax.tree_util.tree_leaves(restored.variables):
    assert np.all(np.isfinite(leaf))


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(teacher_dir, tmp_path):
  config = tiny_config(teacher_dir, num_steps=10, checkpoint_every=10)
  loop.train_and_evaluate(config, str(tmp_path))
  config.num_steps = 20
  config.model.kwargs = {"width": 0.5}
  config.init_from_teacher = False
  with pytest.raises(ValueError, match=r"other settings .*model\.kwargs"):
    loop.train_and_evaluate(config, str(tmp_path))
  # Even when other settings are allowed, other shapes cannot be restored.
  config.allow_resume_with_changes = True
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"does not fit this run's model/config: "
                     r"batch_stats\.stage1\.bn\.mean is float32\(16,\) in "
                     r"the checkpoint and float32\(8,\) in this run"):
    loop.train_and_evaluate(config, str(tmp_path))


class _Exploit:
  """Unpickling this creates a file: proof that code ran."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_crafted_checkpoint_cannot_execute_code(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps(_Exploit(str(marker)))
  step = tmp_path / "run" / "checkpoints" / "5"
  for rel in ("state/checkpoint", "state/_METADATA", "meta/metadata",
              "_CHECKPOINT_METADATA", "state/manifest.ocdbt"):
    (step / rel).parent.mkdir(parents=True, exist_ok=True)
    (step / rel).write_bytes(payload)
  with pytest.raises(checkpoint.CheckpointError):
    inference.restore(str(tmp_path / "run"))
  assert not marker.exists()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(teacher_dir, tmp_path):
  """Two CPU processes (gloo) form one 2-device mesh, each reading its half
  of every global batch; checkpoints and outputs are written once."""
  sizes = {"num_steps": 5, "eval_every": 5, "checkpoint_every": 5,
           "batch_size": 24}
  extra = config_flags(sizes)
  single = tmp_path / "single"  # One process: this one.
  loop.train_and_evaluate(tiny_config(teacher_dir, **sizes), str(single))
  multi = tmp_path / "multi"
  port = _free_port()
  procs = [
      subprocess.Popen(
          main_command(multi, teacher_dir, *extra), cwd=REPO,
          env=dict(ENV, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  single_final, multi_final = _final(single), _final(multi)
  assert multi_final.keys() == single_final.keys()
  for key, value in single_final.items():
    if isinstance(value, float):
      assert multi_final[key] == pytest.approx(value, rel=1e-4), key
    else:
      assert multi_final[key] == value, key
  _assert_same_params(_params(multi), _params(single), rtol=1e-4)
  assert (inference.restore(str(multi)).config ==
          inference.restore(str(single)).config)
  with open(multi / "metrics.jsonl") as f:  # Process 0 alone logs.
    steps = [json.loads(line)["step"] for line in f
             if json.loads(line)["split"] == "train"]
  assert steps == sorted(set(steps))
