"""The end-to-end job: data, teacher, training loop, evaluation, outputs.

``train_and_evaluate(config, workdir)`` is what ``python -m experiments.main``
runs. It resumes automatically from ``WORKDIR/checkpoints`` (state, data
position and RNG included: batches and randomness are functions of the step),
so rerunning a killed command ends with the same final metrics.

Outputs in ``WORKDIR``:

* ``final_metrics.json``: ``test_accuracy``, ``val_accuracy`` (last step),
  ``step``, ``best_val_accuracy``, ``test_accuracy_at_best_val``,
  ``best_step``, ``method``, ``seed``;
* ``metrics.jsonl`` and ``tensorboard/``: training and evaluation metrics;
* ``analysis.json``: per analysed layer, the OT plan between the student and
  the teacher on validation data and its matched fraction (paper Fig. 2);
* ``checkpoints/``: orbax checkpoints (see :mod:`ot_transfer_jax.checkpoint`).

Model selection uses the validation split only; the test accuracy is recorded
at every evaluation but only ever *reported* at the best-validation step and
at the last step.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ot_transfer_jax import checkpoint, data, models, ot, train
from ot_transfer_jax.features import apply_with_features, validate_layers
from ot_transfer_jax.metric_writers import MetricWriter, Progress

FINAL_METRICS = "final_metrics.json"
ANALYSIS = "analysis.json"
# torchvision's ImageNet statistics: pretrained teachers expect them.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
MAX_SAVED_PLAN = 512 * 512


def apply_method(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with ``config.methods[config.method]`` merged into it.

  A method is a nested dict of overrides, e.g. ``{"loss": {"method": "ot"},
  "init_from_teacher": True}``, so every method of an experiment shares
  everything else (data, seeds, schedule). What a method sets wins over the
  top-level keys: change it at its source, e.g.
  ``--config.methods.ot.loss.weight=0.5``.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  methods = config.get("methods") or {}
  if not methods:
    return config
  if config.method not in methods:
    raise ValueError(f"method={config.method!r} is not defined by this "
                     f"config; choose one of {sorted(methods)}.")

  def merge(node, overrides, prefix):
    for key, value in overrides.items():
      if key not in node:
        raise ValueError(f"Method {config.method!r} sets {prefix + key!r}, "
                         "which the config does not have.")
      if isinstance(value, (dict, ml_collections.ConfigDict)) and isinstance(
          node[key], ml_collections.ConfigDict):
        merge(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = value

  overrides = methods[config.method].to_dict()
  logging.info("Method %r sets %s", config.method, overrides)
  merge(config, overrides, "")
  return config


def _stop_requested(interrupted: "_Interrupted", log_step: bool) -> bool:
  """Whether to checkpoint and exit now. With several processes all must
  agree (saving is collective), so they vote at log steps."""
  if jax.process_count() == 1:
    return interrupted.flag
  if not log_step:
    return False
  from jax.experimental import multihost_utils
  votes = multihost_utils.process_allgather(np.int32(interrupted.flag))
  return bool(np.max(votes))


class _Interrupted:
  """SIGTERM sets a flag; the loop then checkpoints and exits cleanly."""

  def __init__(self):
    self.flag = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no handler, no flag.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint before exiting.")
    self.flag = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------


def load_teacher(config, workdir: str):
  """``(teacher_model, teacher_variables)``, or ``(None, {})`` without one.

  ``config.teacher.source``:
    ``"none"``: no teacher (training a teacher, or a plain baseline);
    ``"train"``: train ``config.teacher.job`` (a full config) in
      ``config.teacher.workdir`` (default ``WORKDIR/teacher``) unless that run
      has finished already, then restore it: methods and seeds share one
      cached teacher;
    ``"checkpoint"``: restore the run in ``config.teacher.path``;
    ``"torchvision"``: ImageNet ResNet weights from the ``.safetensors`` file
      ``config.teacher.path`` (torchvision layout);
    ``"random"``: ``config.teacher.name`` at random initialisation, with
      ``config.teacher.num_classes`` classes (smoke tests, debugging).
  """
  t = config.teacher
  source = t.get("source", "none")
  if source == "none":
    return None, {}
  if source == "train":
    tdir = t.get("workdir") or os.path.join(workdir, "teacher")
    # Decided from the (shared) checkpoints, the same on every process.
    finished = os.path.isdir(checkpoint.checkpoint_dir(tdir)) and (
        checkpoint.make_manager(tdir, reading=True).latest_step()
        == t.job.num_steps)
    if not finished:
      logging.info("Training the teacher in %s", tdir)
      train_and_evaluate(t.job, tdir)
    restored = checkpoint.restore(tdir)
    return restored.model, restored.variables
  if source == "checkpoint":
    restored = checkpoint.restore(t.path)
    return restored.model, restored.variables
  if source == "torchvision":
    from ot_transfer_jax.models import pretrained
    if not os.path.isfile(t.path):
      raise FileNotFoundError(
          f"teacher.path={t.path!r}: no such file. Save torchvision's "
          f"ImageNet {t.name} weights as safetensors on a machine with "
          "internet (README, 'Models and representation capture') and point "
          "--config.teacher.path at the file.")
    variables = pretrained.load_torchvision_resnet(t.path, t.name)
    num_classes = variables["params"]["head"]["kernel"].shape[-1]
    return models.create_model(t.name, num_classes,
                               **t.get("kwargs", {})), variables
  if source == "random":
    teacher = models.create_model(t.name, t.num_classes, **t.get("kwargs", {}))
    image_shape = tuple(t.get("image_shape") or ())
    if not image_shape:
      raise ValueError("teacher.source='random' needs teacher.image_shape "
                       "(H, W, C) to initialise the network.")
    return teacher, train.init_model(teacher, jax.random.PRNGKey(0),
                                     jnp.zeros((1, *image_shape)))
  raise ValueError(f"teacher.source={source!r} is not one of ('none', "
                   "'train', 'checkpoint', 'torchvision', 'random').")


# ---------------------------------------------------------------------------
# Analysis (paper Fig. 2)
# ---------------------------------------------------------------------------


def layer_analysis(config, model, variables, teacher, teacher_vars,
                   images) -> dict:
  """OT between each analysed student layer and the teacher's same layer.

  Args:
    images: ``(B, H, W, C)`` validation images.

  Returns:
    ``{"layers": [...], "matched_fraction": [float | None], "plans":
    {layer: (n_s, n_t) nested lists}}``, layers in depth order; plans only
    for layers of at most ``MAX_SAVED_PLAN`` entries (a ResNet-50's last
    stage would be 4M numbers of JSON).
  """
  layers = tuple(config.get("analysis_layers") or ())
  if teacher is None or not layers:
    return {"layers": [], "matched_fraction": [], "plans": {}}
  options = train.ot_options(config.loss)

  @jax.jit
  def solve(variables, teacher_vars, images):
    _, s_feats, _ = apply_with_features(model, variables, images, layers,
                                        train=False)
    _, t_feats, _ = apply_with_features(teacher, teacher_vars, images, layers,
                                        train=False)
    return {layer: ot.solve_neuron_ot(s_feats[layer], t_feats[layer],
                                      **options) for layer in layers}

  results = jax.device_get(solve(variables, teacher_vars, images))
  out = {"layers": list(layers), "matched_fraction": [], "plans": {}}
  for layer in layers:
    mf = float(results[layer].matched_fraction)
    out["matched_fraction"].append(None if np.isnan(mf) else mf)
    plan = np.asarray(results[layer].plan)
    if plan.size <= MAX_SAVED_PLAN:
      out["plans"][layer] = plan.round(6).tolist()
  return out


# ---------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------


def normalization(config, ds) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std): the training set's, or ImageNet's when
  ``config.imagenet_normalization`` (pretrained ImageNet teachers)."""
  if config.get("imagenet_normalization", False):
    return IMAGENET_MEAN, IMAGENET_STD
  return ds.mean, ds.std


def _evaluate(eval_step, variables, source, ds, config, mesh):
  mean, std = normalization(config, ds)
  batches = data.eval_batches(
      source, batch_size=config.eval_batch_size,
      image_size=config.data.get("image_size"), mean=mean, std=std,
      process_index=jax.process_index(), process_count=jax.process_count())
  return train.evaluate(eval_step, variables, batches, mesh)


def _write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (temporary file, then rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict:
  """Trains the student described by ``config`` in ``workdir``; resumes.

  Returns:
    The final metrics (also written to ``WORKDIR/final_metrics.json``).
  """
  config = apply_method(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  ds = data.get_datasets(config.data)
  model = models.create_model(config.model.name, ds.num_classes,
                              **config.model.get("kwargs", {}))
  teacher, teacher_vars = load_teacher(config, workdir)
  if teacher is None:
    teacher = model  # Never applied: nothing reads the teacher.
    if train.needs_teacher(config):
      raise ValueError(
          f"loss.method={config.loss.method!r}, kd_weight, l2_sp or "
          "init_from_teacher needs a teacher, but teacher.source='none'. Set "
          "teacher.source to 'train', 'checkpoint' or 'torchvision'.")

  mesh = train.make_mesh()
  sample = jnp.zeros((config.batch_size, *ds.image_shape), jnp.float32)
  rng = jax.random.PRNGKey(config.seed)
  tx = train.make_optimizer(config.optimizer, config.num_steps)
  init_vars = None
  if config.get("init_from_teacher", False):
    fresh = train.init_model(model, jax.random.fold_in(rng, 1), sample[:1])
    init_vars = train.transfer_init(fresh, teacher_vars,
                                    config.get("transfer_reinit", ("head",)))
  state = train.create_train_state(config, model, teacher, teacher_vars, rng,
                                   sample, tx, init_variables=init_vars)
  reference = {}
  if config.loss.l2_sp > 0:
    reference, _ = train.split_head(teacher_vars["params"])
  analysis_layers = tuple(config.get("analysis_layers") or ())
  if analysis_layers and teacher_vars:
    # Checked now, not after hours of training.
    for name, net, net_vars in (("student", model, state.variables),
                                ("teacher", teacher, teacher_vars)):
      try:
        validate_layers(net, net_vars, sample[:1], analysis_layers)
      except ValueError as e:
        raise ValueError(f"analysis_layers, in the {name}: {e}") from None
  state, teacher_vars, reference = train.replicate(
      (state, teacher_vars, reference), mesh)

  manager = checkpoint.make_manager(workdir,
                                    max_to_keep=config.get("max_to_keep", 3))
  history = {"best_val_accuracy": -1.0, "best_step": 0,
             "test_accuracy_at_best_val": None, "last": {}}
  mean, std = normalization(config, ds)
  meta_base = {"config": checkpoint.config_to_json(config),
               "num_classes": ds.num_classes,
               "mean": np.asarray(mean).tolist(), "std": np.asarray(std).tolist()}
  restored = checkpoint.restore_latest(manager, workdir, state)
  if restored is not None:
    state, meta = restored
    history = meta["history"]
    changed = sorted(k for k in set(meta["config"]) | set(meta_base["config"])
                     if meta["config"].get(k) != meta_base["config"].get(k))
    if changed:  # Same shapes, other settings: allowed (e.g. more steps).
      logging.warning("Resuming %s with config keys changed since the "
                      "checkpoint: %s", workdir, changed)
    logging.info("Resumed from step %d in %s", int(state.step), workdir)
  start = int(state.step)

  train_step = train.make_train_step(config, model, teacher, tx, mesh)
  eval_step = train.make_eval_step(model, mesh)
  batches = data.train_batches(
      ds.train, global_batch_size=config.batch_size, seed=config.seed,
      augment=config.get("augment", "none"),
      image_size=config.data.get("image_size"), mean=mean, std=std,
      process_index=jax.process_index(), process_count=jax.process_count(),
      start_step=start)
  has_val = len(ds.val) > 0
  max_bad = config.loss.get("max_bad_steps", 20)

  with MetricWriter(workdir, process_index=jax.process_index()) as writer, \
      _Interrupted() as interrupted:
    progress = Progress(config.num_steps, start_step=start)
    step = start
    while step < config.num_steps:
      batch = train.shard_batch(next(batches), mesh)
      state, metrics = train_step(state, teacher_vars, reference, batch)
      step += 1
      last = step == config.num_steps
      if step % config.log_every == 0 or last:
        metrics = jax.device_get(metrics)
        writer.write(step, metrics, split="train")
        progress.update(step, loss=metrics["loss"],
                        acc=metrics["accuracy"])
        if int(state.bad_steps) >= max_bad:
          raise FloatingPointError(
              f"{int(state.bad_steps)} consecutive training steps had a "
              f"non-finite loss or gradient (at step {step}); stopping. The "
              f"last good checkpoint in {checkpoint.checkpoint_dir(workdir)} "
              "is kept. Lower the learning rate, raise loss.ot."
              "relative_epsilon, or check the input data.")
      if step % config.eval_every == 0 or last:
        variables = state.variables
        val = (_evaluate(eval_step, variables, ds.val, ds, config, mesh)
               if has_val else None)
        test = _evaluate(eval_step, variables, ds.test, ds, config, mesh)
        if val is not None:
          writer.write(step, {"accuracy": val["accuracy"],
                              "loss": val["loss"]}, split="val")
        writer.write(step, {"accuracy": test["accuracy"],
                            "loss": test["loss"]}, split="test")
        selection = val["accuracy"] if val is not None else test["accuracy"]
        if val is None or selection > history["best_val_accuracy"]:
          history.update(best_val_accuracy=selection, best_step=step,
                         test_accuracy_at_best_val=test["accuracy"])
        history["last"] = {"step": step, "test_accuracy": test["accuracy"],
                           "val_accuracy": None if val is None else
                           val["accuracy"]}
      stop = _stop_requested(interrupted, step % config.log_every == 0)
      if step % config.checkpoint_every == 0 or last or stop:
        checkpoint.save(manager, step, state, {**meta_base,
                                               "history": history})
      if stop and not last:
        raise KeyboardInterrupt(
            f"Stopped by SIGTERM at step {step}; checkpoint saved in "
            f"{checkpoint.checkpoint_dir(workdir)}. Rerun the same command to "
            "resume.")

  first = next(data.eval_batches(
      ds.val if has_val else ds.test,
      batch_size=config.get("analysis_batch_size", 256),
      image_size=config.data.get("image_size"), mean=mean, std=std))
  images = first["image"][first["mask"]]
  analysis = (layer_analysis(config, model, jax.device_get(state.variables),
                             teacher, jax.device_get(teacher_vars), images)
              if is_main else {})
  final = {
      "method": config.get("method"),
      "seed": config.seed,
      "step": int(state.step),
      "test_accuracy": history["last"]["test_accuracy"],
      "val_accuracy": history["last"]["val_accuracy"],
      "best_val_accuracy": history["best_val_accuracy"] if has_val else None,
      "best_step": history["best_step"],
      "test_accuracy_at_best_val": history["test_accuracy_at_best_val"],
  }
  if is_main:
    _write_json(os.path.join(workdir, ANALYSIS), analysis)
    _write_json(os.path.join(workdir, FINAL_METRICS), final)
  logging.info("Final metrics: %s", final)
  return final
