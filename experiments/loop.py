"""The end-to-end run: ``train_and_evaluate(config, workdir)``.

What ``python -m experiments.main`` runs. It resumes automatically from
``WORKDIR/checkpoints`` (state, data position and RNG included: batches and
randomness are functions of the step), so rerunning a killed command ends with
the same final metrics.

Outputs in ``WORKDIR``:

* ``final_metrics.json``: ``test_accuracy``, ``val_accuracy`` (last
  evaluation), ``step``, ``best_val_accuracy``, ``test_accuracy_at_best_val``,
  ``best_step`` (``None`` without a validation split: nothing to select on),
  ``method``, ``seed``, ``history_from_step`` (where the reported history
  starts: 0, or the step a resume with ``allow_resume_with_changes`` began);
* ``metrics.jsonl`` and ``tensorboard/``: training and evaluation metrics;
* ``analysis.json``: per analysed layer, the OT plan between the student and
  the teacher on validation data and its matched fraction (paper Fig. 2);
* ``checkpoints/``: orbax checkpoints (see :mod:`ot_transfer_jax.checkpoint`);
* ``.lock``: held by the running process (one run per workdir, see
  :mod:`experiments.workdir_lock`).

Model selection uses the validation split only; the test accuracy is recorded
at every evaluation but only ever *reported* at the best-validation step and
at the last step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from experiments import analysis, interrupts, same_run, workdir_lock
from experiments import job as job_lib
from experiments.job import Job, Teacher, setup
from experiments.metric_writers import MetricWriter, Progress
from ot_transfer_jax import checkpoint, parallel, train

FINAL_METRICS = "final_metrics.json"
ANALYSIS = "analysis.json"


def is_finished(workdir: str) -> bool:
  """Whether ``workdir`` holds a finished run (its FINAL_METRICS): one that
  a tool reuses instead of training."""
  return os.path.exists(os.path.join(workdir, FINAL_METRICS))


class Preempted(Exception):
  """SIGTERM or SIGINT: a checkpoint was saved; rerunning the command resumes.

  ``exit_code`` is the shell's for the signal: 143 (SIGTERM), 130 (SIGINT).
  """

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


class Diverged(Exception):
  """Too many consecutive non-finite steps; the last good checkpoint is kept."""


@dataclasses.dataclass
class History:
  """Model selection on the validation split, and the last evaluation.

  Without a validation split nothing is selected: the ``best_*`` fields stay
  ``None`` and only the last evaluation is reported.
  """

  #: The step this history starts from: 0, or where a resume with changed
  #: settings (``allow_resume_with_changes``) began a new section.
  from_step: int = 0
  best_step: Optional[int] = None
  best_val_accuracy: Optional[float] = None
  test_accuracy_at_best_val: Optional[float] = None
  last_step: Optional[int] = None
  last_val_accuracy: Optional[float] = None
  last_test_accuracy: Optional[float] = None

  def is_best(self, val_accuracy: Optional[float]) -> bool:
    """Whether ``val_accuracy`` would become the best (first of equals)."""
    return val_accuracy is not None and (self.best_val_accuracy is None or
                                         val_accuracy > self.best_val_accuracy)

  def record(self, step: int, val_accuracy: Optional[float],
             test_accuracy: Optional[float]) -> None:
    if self.is_best(val_accuracy):
      self.best_step, self.best_val_accuracy = step, val_accuracy
      self.test_accuracy_at_best_val = test_accuracy
    self.last_step, self.last_val_accuracy = step, val_accuracy
    self.last_test_accuracy = test_accuracy


def itstime(step: int, every: int, total: int) -> bool:
  """Whether a periodic action (log, eval, checkpoint) runs after ``step``."""
  return step == total or (every > 0 and step % every == 0)


def _stop_requested(log_step: bool) -> Optional[int]:
  """The signal to checkpoint and stop for now (:mod:`experiments.interrupts`),
  or None. With several processes all must agree (saving is collective), so
  they vote at log steps; a process that got no signal itself reports
  SIGTERM (what a scheduler sends)."""
  signum = interrupts.pending()
  if jax.process_count() == 1:
    return signum
  if not log_step:
    return None
  from jax.experimental import multihost_utils
  votes = multihost_utils.process_allgather(np.int32(signum is not None))
  return (signum or int(signal.SIGTERM)) if np.max(votes) else None


def _run_meta(job: Job, history: History) -> checkpoint.RunMeta:
  """What a checkpoint stores besides the state: the fields
  ``inference.restore`` rebuilds the model from, read from the config here
  (the library never reads it), and the config itself for resuming."""
  classes = job.config.data.classes
  return checkpoint.RunMeta(
      config=checkpoint.config_to_json(job.config),
      num_classes=job.ds.num_classes,
      mean=tuple(np.asarray(job.mean).tolist()),
      std=tuple(np.asarray(job.std).tolist()),
      history=dataclasses.asdict(history),
      model=job.config.model.name,
      model_kwargs=checkpoint.config_to_json(job.config.model.kwargs),
      # The dataset's class id of each output (outputs 0..k-1 are
      # data.classes in order, or every class).
      class_ids=tuple(int(c) for c in (
          classes if classes is not None else range(job.ds.num_classes))),
      # (H, W, C) of the model's inputs: predict checks images against it.
      image_shape=tuple(job.ds.image_shape))


def resume(job: Job, manager,
           strict: bool = False) -> tuple[train.TrainState, History]:
  """The newest intact checkpoint's state and history, or a fresh start.

  A checkpoint written with other settings (data, model, method, loss,
  optimizer, seed, ...: :mod:`experiments.same_run` says what may change) is
  refused, unless ``allow_resume_with_changes``: then the run continues with
  a new history section (model selection restarts at the resumed step).
  ``strict``: any difference but result-neutral settings is refused (see
  :func:`train_and_evaluate`).
  """
  now = checkpoint.config_to_json(job.config)
  allowed = job.config.allow_resume_with_changes
  changes = []

  def check(step: int, meta: checkpoint.RunMeta) -> None:
    if strict:
      other = same_run.record_differences(meta.config, now)
      if other:
        raise ValueError(
            f"{job.workdir} holds a checkpoint (step {step}) of another run "
            f"than this record's: {'; '.join(other[:8])}. Use a new "
            "--workdir (or delete that one): a record states one run's "
            "settings.")
    changes[:] = same_run.resume_differences(meta.config, now)
    if changes and not allowed:
      shown = "; ".join(changes[:8]) + ("; ..." if len(changes) > 8 else "")
      raise ValueError(
          f"{job.workdir} holds a run with other settings (checkpoint of "
          f"step {step}): {shown}. Use a new --workdir for this run, or "
          "continue that one with the new settings by adding "
          "--config.allow_resume_with_changes=True (model selection then "
          f"restarts from step {step}, so no reported metric mixes the two).")

  restored = checkpoint.restore_latest(manager, job.workdir, job.initial_state,
                                       check_meta=check)
  if restored is None:
    return job.initial_state, History()
  state, meta = restored
  step = int(state.step)
  history = History(**meta.history)
  if changes:
    logging.warning("Resuming %s at step %d with changed settings, as "
                    "allowed: %s. A new history section starts here.",
                    job.workdir, step, "; ".join(changes))
    history = History(from_step=step)
  logging.info("Resumed from step %d in %s", step, job.workdir)
  return state, history


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       role: str = "student", strict: bool = False) -> dict:
  """Trains the student described by ``config`` in ``workdir``; resumes.

  Args:
    config: the run's config (``experiments/configs``).
    workdir: where its outputs go (see the module docstring).
    role: what the log lines call the run: ``"student"``, or ``"teacher"``
      for a teacher job (:func:`ensure_teacher`).
    strict: resume only a checkpoint of exactly this run (only
      result-neutral settings may differ, :func:`same_run.record_differences`),
      whatever ``allow_resume_with_changes`` says: what a record of the run
      (``experiments.runs``) needs, since it states ``config`` as the run's.

  Returns:
    The final metrics (also written to ``WORKDIR/final_metrics.json``).

  Raises:
    Preempted: SIGTERM or SIGINT; a checkpoint was saved.
    Diverged: ``loss.max_bad_steps`` consecutive non-finite steps.
    workdir_lock.WorkdirLocked: another live run holds ``workdir``.
  """
  interrupts.check()  # A signal whose exception something swallowed.
  with workdir_lock.hold(workdir):
    return _train_and_evaluate(config, workdir, role, strict)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        role: str, strict: bool = False) -> dict:
  job = setup(config, workdir, ensure_teacher(config, workdir))
  manager = checkpoint.make_manager(workdir, max_to_keep=config.max_to_keep)
  state, history = resume(job, manager, strict)
  batches = job.train_batches(start_step=int(state.step))
  total = config.num_steps
  logging.info("%s", _header(config, workdir, role, int(state.step)))
  with MetricWriter(workdir, process_index=jax.process_index(),
                    resume_step=int(state.step)) as writer, \
      interrupts.deferred():
    progress = Progress(total, start_step=int(state.step))
    for step in range(int(state.step) + 1, total + 1):
      batch = parallel.shard_batch(next(batches), job.mesh)
      state, metrics = job.train_step(state, job.teacher_vars, batch)
      if itstime(step, config.log_every, total):
        metrics = jax.device_get(metrics)
        writer.write(step, metrics, split="train")
        progress.update(step, loss=metrics["loss"], acc=metrics["accuracy"])
        if int(state.bad_steps) >= config.loss.max_bad_steps:
          raise Diverged(
              f"{int(state.bad_steps)} consecutive training steps had a "
              f"non-finite loss or gradient (at step {step}); stopping. The "
              f"last good checkpoint in {checkpoint.checkpoint_dir(workdir)} "
              "is kept. Lower the learning rate, raise the ot term's "
              "relative_epsilon, or check the input data.")
      if itstime(step, config.eval_every, total):
        history.record(step, *_evaluate(job, state, writer, step, history,
                                        last=step == total))
        if history.last_val_accuracy is not None:
          logging.info("step %d/%d | val accuracy %.4f | best %.4f at step %d",
                       step, total, history.last_val_accuracy,
                       history.best_val_accuracy, history.best_step)
      stop = _stop_requested(itstime(step, config.log_every, total))
      if itstime(step, config.checkpoint_every, total) or stop:
        checkpoint.save(manager, step, state, _run_meta(job, history))
      if stop:  # Also at the last step: the signal is never ignored.
        raise Preempted(
            f"Stopped by {signal.Signals(stop).name} at step {step}; "
            f"checkpoint saved in {checkpoint.checkpoint_dir(workdir)}. "
            "Rerun the same command to resume.", 128 + int(stop))
  return finish(job, state, history, role)


def _header(config, workdir: str, role: str, step: int) -> str:
  """The line that opens a run's log: which run, what it trains, where."""
  what = [f"method {config.method}"] if config.method else []
  what += [f"model {config.model.name}", f"seed {config.seed}"]
  start = (f"from step {step} of {config.num_steps}" if step else
           f"{config.num_steps} steps")
  return (f"{'Resuming' if step else 'Training'} the {role} "
          f"({', '.join(what)}; {start}) in {workdir}")


def ensure_teacher(config: ml_collections.ConfigDict, workdir: str) -> Teacher:
  """The run's teacher (:func:`experiments.job.load_teacher`). A
  ``teacher.source='train'`` teacher not trained yet is trained first, by
  :func:`train_and_evaluate` in ``teacher.workdir`` (resuming, if it was
  interrupted), after the student's config is checked against an untrained
  teacher of the same architecture."""
  teacher = job_lib.load_teacher(config, workdir)
  if teacher is not None:
    return teacher
  job_lib.check_student(config, workdir,
                        job_lib.untrained_teacher(config.teacher.job))
  tdir = job_lib.teacher_workdir(config, workdir)
  train_and_evaluate(config.teacher.job, tdir, role="teacher")
  teacher = job_lib.load_teacher(config, workdir)
  if teacher is None:  # Damaged as soon as written: do not loop.
    raise checkpoint.CheckpointError(
        f"The teacher trained in {tdir} cannot be restored; rerun the "
        "command to resume it, or point --config.teacher.workdir at a new "
        "directory.")
  return teacher


def _evaluate(job: Job, state, writer, step: int, history: History,
              last: bool):
  """``(val_accuracy or None, test_accuracy or None)``, written to the
  metrics. With ``test_every_eval`` False the test split is evaluated only
  where a read needs it: at a new best validation accuracy and at the last
  step (frequent evaluation of a 5,000-image test split would cost more than
  the training steps of a small study run)."""
  variables = state.variables
  accuracies = []
  for split, source in (("val", job.ds.val if job.has_val else None),
                        ("test", job.ds.test)):
    needed = (split == "val" or job.config.test_every_eval or last
              or not job.has_val or history.is_best(accuracies[0]))
    if source is None or not needed:
      accuracies.append(None)
      continue
    result = job.evaluate(variables, source)
    writer.write(step, {"accuracy": result["accuracy"],
                        "loss": result["loss"]}, split=split)
    accuracies.append(result["accuracy"])
  return tuple(accuracies)


def finish(job: Job, state, history: History, role: str = "student") -> dict:
  """Writes ``analysis.json`` and ``final_metrics.json`` (process 0)."""
  interrupts.check()  # A signal whose exception something swallowed.
  final = {
      "method": job.config.method,
      "seed": job.config.seed,
      "step": int(state.step),
      "test_accuracy": history.last_test_accuracy,
      "val_accuracy": history.last_val_accuracy,
      "best_val_accuracy": history.best_val_accuracy,
      "best_step": history.best_step,
      "test_accuracy_at_best_val": history.test_accuracy_at_best_val,
      # > 0 when a resume changed the settings: the above is from there on.
      "history_from_step": history.from_step,
  }
  if jax.process_index() == 0:
    write_json(os.path.join(job.workdir, ANALYSIS),
                analysis.run_analysis(job, jax.device_get(state.variables)))
    write_json(os.path.join(job.workdir, FINAL_METRICS), final)
  logging.info("Final metrics of the %s in %s: %s", role, job.workdir,
               {k: v for k, v in final.items() if v != "" or k != "method"})
  return final


def write_json(path: str, obj: Any, indent: int = 2) -> None:
  """Writes ``obj`` to ``path`` atomically (a temporary file, then a rename:
  an interrupted write never leaves half a file); makes the folder."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=indent)
  os.replace(tmp, path)
