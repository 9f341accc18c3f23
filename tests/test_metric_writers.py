"""Metric files (JSON lines, TensorBoard) and the progress line."""

import json
import logging
import math
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from experiments.metric_writers import (MetricWriter, Progress,
                                            eta_seconds, format_duration,
                                            read_metrics, steps_per_second)


def strict_json_lines(path):
  """Parses every line, refusing the NaN/Infinity extensions of Python json."""

  def refuse(constant):
    raise ValueError(f"not JSON: {constant}")

  with open(path) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def test_records_are_valid_json_with_nan_as_null(tmp_path):
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(1, {"loss": np.float32(0.5), "acc": jnp.asarray(0.25),
                     "reg": float("nan"), "iters": 7})
    writer.write(1, {"accuracy": 0.75}, split="val")
  lines = strict_json_lines(tmp_path / "metrics.jsonl")
  assert lines[0]["reg"] is None
  keys = ("step", "split", "loss", "acc", "iters")
  assert {k: lines[0][k] for k in keys} == {
      "step": 1, "split": "train", "loss": 0.5, "acc": 0.25, "iters": 7.0}
  assert abs(lines[0]["time"] - time.time()) < 60
  records = read_metrics(str(tmp_path))
  assert math.isnan(records[0]["reg"])
  assert read_metrics(str(tmp_path), split="val")[0]["accuracy"] == 0.75


def test_reserved_names_and_closed_writer_raise(tmp_path):
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  with pytest.raises(ValueError, match="reserved"):
    writer.write(0, {"step": 1.0})
  writer.close()
  with pytest.raises(ValueError, match="closed"):
    writer.write(0, {"loss": 1.0})


def test_other_processes_write_nothing(tmp_path):
  workdir = tmp_path / "run"
  with MetricWriter(str(workdir), process_index=1) as writer:
    writer.write(0, {"loss": 1.0})
    writer.flush()
  assert not workdir.exists()


def test_resume_appends_and_read_keeps_last_record_per_step(tmp_path):
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    for step in (10, 20, 30):
      writer.write(step, {"loss": 1.0})
    writer.write(20, {"accuracy": 0.5}, split="val")
  # Killed after step 30, resumed from the checkpoint at step 10.
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    for step in (20, 30, 40):
      writer.write(step, {"loss": 2.0})
  assert len(strict_json_lines(tmp_path / "metrics.jsonl")) == 7
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [(r["split"], r["step"], r.get("loss")) for r in records] == [
      ("train", 10, 1.0), ("val", 20, None), ("train", 20, 2.0),
      ("train", 30, 2.0), ("train", 40, 2.0)]


def test_resume_step_drops_the_records_logged_past_the_checkpoint(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    for step in (10, 20, 30):
      writer.write(step, {"loss": 1.0})
      writer.write(step, {"accuracy": 0.5}, split="val")
  time.sleep(1.05)  # Event files are named by the second they were opened in.
  # Killed after step 30, resumed from the checkpoint at step 10 (logging
  # every 20 steps now: the stale step 30 must not survive).
  with MetricWriter(str(tmp_path), resume_step=10) as writer:
    assert [(r["split"], r["step"]) for r in strict_json_lines(
        tmp_path / "metrics.jsonl")] == [("train", 10), ("val", 10)]
    writer.write(20, {"loss": 2.0})
  lines = strict_json_lines(tmp_path / "metrics.jsonl")
  assert [(r["split"], r["step"], r.get("loss")) for r in lines] == [
      ("train", 10, 1.0), ("val", 10, None), ("train", 20, 2.0)]
  assert not (tmp_path / "metrics.jsonl.tmp").exists()
  assert load_scalars(tmp_path / "tensorboard" / "train") == {
      "loss": [(10, 1.0), (20, 2.0)]}
  # From scratch (no checkpoint survived): nothing is kept.
  with MetricWriter(str(tmp_path), tensorboard=False, resume_step=0):
    pass
  assert strict_json_lines(tmp_path / "metrics.jsonl") == []


def test_truncated_last_line_is_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 2.0})
  with open(path, "a") as f:
    f.write('{"step": 3, "split": "tra')  # a crash mid-write
  assert [r["step"] for r in read_metrics(str(path))] == [1, 2]
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(3, {"loss": 3.0})
  assert [r["step"] for r in strict_json_lines(path)] == [1, 2, 3]


def test_complete_last_line_without_newline_is_kept(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "split": "train", "time": 0, "loss": 1.0}')
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(2, {"loss": 2.0})
  assert [r["step"] for r in strict_json_lines(path)] == [1, 2]


def test_corrupt_middle_line_raises(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "split": "train"}\n{"ste\n'
                  '{"step": 2, "split": "train"}\n')
  with pytest.raises(ValueError, match="record 2"):
    read_metrics(str(path))


def load_scalars(logdir):
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
          for tag in acc.Tags()["scalars"]}


def test_tensorboard_round_trip(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    for step in range(1, 4):
      writer.write(step, {"loss": 1.0 / step,
                          "matched_fraction/stage2->stage2": 0.1 * step})
    writer.write(3, {"accuracy": 0.625}, split="val")
  train = load_scalars(tmp_path / "tensorboard" / "train")
  assert set(train) == {"loss", "matched_fraction/stage2->stage2"}
  assert [s for s, _ in train["loss"]] == [1, 2, 3]
  # simple_value is a float32.
  np.testing.assert_allclose([v for _, v in train["loss"]],
                             [1.0, 0.5, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(
      [v for _, v in train["matched_fraction/stage2->stage2"]],
      [0.1, 0.2, 0.3], rtol=1e-6)
  assert load_scalars(tmp_path / "tensorboard" / "val") == {
      "accuracy": [(3, 0.625)]}


def test_tensorboard_resume_drops_stale_steps(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    for step in range(1, 6):
      writer.write(step, {"loss": 1.0})
  # Event files are named by the second they were opened in: keep them apart.
  time.sleep(1.05)
  with MetricWriter(str(tmp_path)) as writer:
    writer.write(3, {"loss": 2.0})
  assert len(os.listdir(tmp_path / "tensorboard" / "train")) == 2
  assert load_scalars(tmp_path / "tensorboard" / "train") == {
      "loss": [(1, 1.0), (2, 1.0), (3, 2.0)]}


def test_rate_eta_and_duration():
  assert steps_per_second(100, 4.0) == 25.0
  assert steps_per_second(0, 4.0) == steps_per_second(5, 0.0) == 0.0
  assert eta_seconds(100, 1000, 25.0) == 36.0
  assert eta_seconds(1200, 1000, 25.0) == 0.0
  assert eta_seconds(100, 1000, 0.0) is None
  assert format_duration(25.4) == "0:00:25"
  assert format_duration(3 * 3600 + 65) == "3:01:05"
  assert format_duration(None) == "?"


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_line(caplog):
  clock = FakeClock()
  progress = Progress(1000, clock=clock)
  assert progress.update(0) == "step 0/1000 (0.0%) | ? steps/s | ETA ?"
  clock.now += 4.0
  caplog.set_level(logging.INFO, logger="absl")
  line = progress.update(120, loss=0.41234, acc=np.float32(0.912))
  # 120 steps in 4 s: 30 steps/s, 880 steps left: 29.3 s.
  assert line == ("step 120/1000 (12.0%) | 30.0 steps/s | ETA 0:00:29 | "
                  "loss 0.4123 acc 0.912")
  assert line in caplog.text


def test_progress_after_resume_counts_only_new_steps():
  clock = FakeClock()
  progress = Progress(1000, start_step=800, clock=clock)
  clock.now += 10.0
  # 100 steps in 10 s since the resume, not 900 steps.
  assert progress.update(900) == (
      "step 900/1000 (90.0%) | 10.0 steps/s | ETA 0:00:10")


def test_progress_slow_steps_shown_as_seconds_per_step():
  clock = FakeClock()
  progress = Progress(10, clock=clock)
  clock.now += 5.0
  assert progress.update(2) == "step 2/10 (20.0%) | 2.50 s/step | ETA 0:00:20"
