"""Metric logging: a JSON-lines file, TensorBoard scalars and a progress line.

:class:`MetricWriter` writes, on process 0 only::

  WORKDIR/metrics.jsonl              one JSON object per write():
                                     {"step", "split", "time", <metric>: float}
  WORKDIR/tensorboard/<split>/       TensorBoard event files (scalars)

``metrics.jsonl`` is the source of truth for reports (:func:`read_metrics`).
TensorBoard files are written with the ``tensorboard`` package's own protobufs
and record writer, so TensorFlow is not needed.

Resumed runs append to the same files. A run killed after its last checkpoint
has logged steps past it: ``MetricWriter(..., resume_step=s)`` first drops
the records after step ``s`` from ``metrics.jsonl`` (atomically: a new file
renamed over the old one), so no step is ever logged twice, and each
TensorBoard writer starts with a ``SessionLog.START`` event at step ``s + 1``,
which makes TensorBoard drop its stale events from there on.

:class:`Progress` formats a one-line status with throughput and ETA.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED_KEYS = ("step", "split", "time")


class MetricWriter:
  """Writes scalar metrics to ``metrics.jsonl`` and TensorBoard.

  Usage::

    with MetricWriter(workdir, process_index=jax.process_index()) as writer:
      writer.write(step, {"loss": loss, "accuracy": acc})
      writer.write(step, {"accuracy": val_acc}, split="val")

  Every process may call every method; only process 0 writes anything.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True,
               process_index: int = 0, resume_step: Optional[int] = None):
    """Opens (creating or appending to) the metric files of ``workdir``.

    Args:
      workdir: the run's directory.
      tensorboard: also write TensorBoard event files.
      process_index: ``jax.process_index()``; other processes write nothing.
      resume_step: the step the run resumes from (0: from scratch); records
        of later steps, logged by a run that went past its last checkpoint,
        are dropped. None keeps every record.
    """
    self._workdir = workdir
    self._tensorboard = tensorboard
    self._active = process_index == 0
    self._resume_step = resume_step
    self._tb_writers: Dict[str, EventFileWriter] = {}
    self._file = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, METRICS_FILE)
      if os.path.exists(path):
        _repair_last_line(path)
        if resume_step is not None:
          truncate_metrics(path, resume_step)
      self._file = open(path, "a", encoding="utf-8")

  def write(self, step: int, metrics: Mapping[str, Any],
            split: str = "train") -> None:
    """Logs one set of scalars at ``step``.

    Args:
      step: the training step the metrics belong to.
      metrics: ``{name: scalar}``; Python, NumPy or 0-d JAX numbers. Non-finite
        values are written as ``null`` in the JSON file (JSON has no NaN) and
        as they are to TensorBoard.
      split: ``"train"``, ``"val"``, ``"test"``, ...

    Raises:
      ValueError: a metric is named ``step``, ``split`` or ``time``, or the
        writer is closed.
    """
    if not self._active:
      return
    if self._file is None:
      raise ValueError("write() on a closed MetricWriter.")
    clash = [k for k in metrics if k in _RESERVED_KEYS]
    if clash:
      raise ValueError(f"Metric names {clash} are reserved ({_RESERVED_KEYS}).")
    step = int(step)
    values = {name: float(value) for name, value in metrics.items()}
    now = time.time()
    record = {"step": step, "split": split, "time": now}
    record.update(
        {k: (v if math.isfinite(v) else None) for k, v in values.items()})
    # One write() per line, flushed at once: a crash can only cut the last
    # line, which the next MetricWriter on this workdir drops.
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._tensorboard:
      self._write_tensorboard(split, step, now, values)

  def _write_tensorboard(self, split: str, step: int, wall_time: float,
                         values: Mapping[str, float]) -> None:
    writer = self._tb_writers.get(split)
    if writer is None:
      writer = EventFileWriter(
          os.path.join(self._workdir, TENSORBOARD_DIR, split))
      # Marks a (re)start: TensorBoard discards this split's earlier events at
      # steps >= the start's, left by a run that went past its last checkpoint.
      start = step if self._resume_step is None else self._resume_step + 1
      writer.add_event(event_pb2.Event(
          wall_time=wall_time, step=start,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
      self._tb_writers[split] = writer
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=name, simple_value=value)
        for name, value in values.items()])
    writer.add_event(
        event_pb2.Event(wall_time=wall_time, step=step, summary=summary))

  def flush(self) -> None:
    """Pushes everything written so far to disk."""
    if self._file is not None:
      self._file.flush()
    for writer in self._tb_writers.values():
      writer.flush()

  def close(self) -> None:
    """Flushes and closes the files; later calls are no-ops."""
    if self._file is not None:
      self._file.close()
      self._file = None
    for writer in self._tb_writers.values():
      writer.close()
    self._tb_writers = {}

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _parse_line(line: str) -> Optional[dict]:
  """The record on ``line``, or None if it is not a JSON object."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record if isinstance(record, dict) else None


def _repair_last_line(path: str) -> None:
  """Drops a last line cut short by a crash (or ends a whole one with \\n)."""
  with open(path, "rb+") as f:
    data = f.read()
    if not data:
      return
    complete = data.endswith(b"\n")
    body = data[:-1] if complete else data
    start = body.rfind(b"\n") + 1
    last = body[start:].decode("utf-8", errors="replace")
    if _parse_line(last) is None:
      logging.warning("%s: dropping a truncated last line %r.", path,
                      last[:80])
      f.truncate(start)
    elif not complete:
      f.write(b"\n")


def truncate_metrics(path: str, last_step: int) -> int:
  """Drops the records of steps after ``last_step`` from a metrics file.

  Atomic: the kept lines go to a temporary file renamed over ``path``, so a
  crash leaves either the old or the new file, never a mix.

  Returns:
    The number of records dropped.
  """
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  kept = [line for line in lines if line.strip() and not (
      (record := _parse_line(line)) is not None
      and record.get("step", 0) > last_step)]
  dropped = sum(1 for line in lines if line.strip()) - len(kept)
  if dropped:
    logging.info("%s: dropping %d records after step %d (logged past the "
                 "last checkpoint).", path, dropped, last_step)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
  return dropped


def read_metrics(path_or_workdir: str,
                 split: Optional[str] = None) -> List[dict]:
  """Reads ``metrics.jsonl``, keeping the last record of each (split, step).

  Args:
    path_or_workdir: the file, or the run directory holding it.
    split: if given, only the records of this split.

  Returns:
    The records sorted by step (ties in file order), ``null`` values read back
    as NaN. A last line that is not valid JSON (a crash, or a run still
    writing) is skipped.

  Raises:
    ValueError: a line other than the last is not a JSON object.
  """
  path = path_or_workdir
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f.read().split("\n") if line.strip()]
  latest: Dict[tuple, tuple] = {}
  for i, line in enumerate(lines):
    record = _parse_line(line)
    if record is None:
      if i == len(lines) - 1:
        continue
      raise ValueError(f"{path}: record {i + 1} is not a JSON object: "
                       f"{line[:80]!r}")
    if split is not None and record["split"] != split:
      continue
    for key, value in record.items():
      if value is None:
        record[key] = math.nan
    latest[(record["split"], record["step"])] = (i, record)
  return [record for _, record in
          sorted(latest.values(), key=lambda ir: (ir[1]["step"], ir[0]))]


# ---------------------------------------------------------------------------
# Progress line
# ---------------------------------------------------------------------------


def steps_per_second(steps: float, seconds: float) -> float:
  """Throughput; 0 when nothing can be measured yet."""
  return steps / seconds if seconds > 0 and steps > 0 else 0.0


def eta_seconds(step: int, total_steps: int, rate: float) -> Optional[float]:
  """Seconds left to reach ``total_steps`` at ``rate``; None if rate is 0."""
  if rate <= 0:
    return None
  return max(total_steps - step, 0) / rate


def format_duration(seconds: Optional[float]) -> str:
  """``H:MM:SS`` (``"1 day, 2:03:04"`` past a day); ``"?"`` for unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=round(seconds)))


def _format_rate(rate: float) -> str:
  if rate <= 0:
    return "? steps/s"
  if rate < 1:
    return f"{1 / rate:.2f} s/step"
  return f"{rate:.1f} steps/s"


class Progress:
  """A progress line with throughput and ETA, for long training loops.

  The rate is measured from construction at ``start_step``, so a resumed run
  counts only the steps it did itself. Construct it just before the loop; the
  first steps include compilation, which the average soon absorbs.

  Usage::

    progress = Progress(total_steps, start_step=int(state.step))
    ...
    progress.update(step, loss=loss, acc=acc)
    # step 120/1000 (12.0%) | 35.2 steps/s | ETA 0:00:25 | loss 0.4123 acc 0.912
  """

  def __init__(self, total_steps: int, start_step: int = 0,
               clock: Callable[[], float] = time.monotonic):
    """Starts the clock.

    Args:
      total_steps: the step the loop ends at.
      start_step: the step the loop starts from (a resumed run's step).
      clock: seconds, monotonic; injectable for tests.
    """
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self._clock = clock
    self._start_time = clock()

  def update(self, step: int, **scalars: Any) -> str:
    """Formats, logs (absl INFO) and returns the line for ``step``.

    Args:
      step: the current step.
      **scalars: values shown after the ETA, with 4 significant digits.
    """
    rate = steps_per_second(step - self.start_step,
                            self._clock() - self._start_time)
    eta = eta_seconds(step, self.total_steps, rate)
    percent = 100.0 * step / self.total_steps if self.total_steps else 100.0
    line = (f"step {step}/{self.total_steps} ({percent:.1f}%) | "
            f"{_format_rate(rate)} | ETA {format_duration(eta)}")
    if scalars:
      line += " | " + " ".join(
          f"{name} {float(value):.4g}" for name, value in scalars.items())
    logging.info("%s", line)
    return line
