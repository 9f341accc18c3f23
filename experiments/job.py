"""Setting a run up: data, teacher, student, optimizer and steps, as one frozen ``Job``.

:func:`setup` does everything before the first step and checks what can be
checked there; :mod:`experiments.loop` runs the steps.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from ot_transfer_jax import checkpoint, data, models, regularizers, train
from ot_transfer_jax.features import validate_layers

# torchvision's ImageNet statistics: pretrained teachers expect them.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclasses.dataclass(frozen=True)
class Job:
  """Everything a run needs that does not change while it trains.

  ``initial_state`` is the fresh (step-0) state, replicated on the mesh;
  ``teacher`` is ``None`` when nothing reads one.
  """

  config: ml_collections.ConfigDict
  workdir: str
  ds: data.Datasets
  model: Any
  teacher: Optional[Any]
  teacher_vars: Any
  mesh: Mesh
  tx: optax.GradientTransformation
  initial_state: train.TrainState
  train_step: Callable
  eval_step: Callable
  mean: np.ndarray
  std: np.ndarray

  @property
  def has_val(self) -> bool:
    return len(self.ds.val) > 0

  def train_batches(self, start_step: int):
    """Host batches of this process from ``start_step`` on (exact resume)."""
    c = self.config
    return data.train_batches(
        self.ds.train, global_batch_size=c.batch_size, seed=c.seed,
        augment=c.augment, image_size=c.data.image_size, mean=self.mean,
        std=self.std, process_index=jax.process_index(),
        process_count=jax.process_count(), start_step=start_step)

  def eval_batches(self, source, batch_size: Optional[int] = None):
    return data.eval_batches(
        source, batch_size=batch_size or self.config.eval_batch_size,
        image_size=self.config.data.image_size, mean=self.mean, std=self.std,
        process_index=jax.process_index(), process_count=jax.process_count())

  def evaluate(self, variables, source) -> dict:
    """Accuracy and mean loss of ``variables`` on a split."""
    return train.evaluate(self.eval_step, variables,
                          self.eval_batches(source), self.mesh)


def normalization(config, ds) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std): the training set's, or ImageNet's when
  ``config.imagenet_normalization`` (pretrained ImageNet teachers)."""
  if config.imagenet_normalization:
    return IMAGENET_MEAN, IMAGENET_STD
  return ds.mean, ds.std


def load_teacher(config, workdir: str, train_teacher: Callable,
                 before_training: Optional[Callable] = None):
  """``(teacher_model, teacher_variables)``, or ``(None, {})`` without one.

  ``before_training(teacher, untrained_teacher_vars)`` is called before a
  teacher is trained (``source='train'``), to check the student's config
  first: a typo must not cost the teacher's training time.

  ``config.teacher.source``:
    ``"none"``: no teacher (training a teacher, or a plain baseline);
    ``"train"``: ``train_teacher(config.teacher.job, teacher_workdir)`` in
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
  if t.source == "none":
    return None, {}
  if t.source == "train":
    tdir = t.workdir or os.path.join(workdir, "teacher")
    # Decided from the (shared) checkpoints, the same on every process.
    finished = os.path.isdir(checkpoint.checkpoint_dir(tdir)) and (
        checkpoint.make_manager(tdir, reading=True).latest_step()
        == t.job.num_steps)
    if finished:
      try:
        restored = checkpoint.restore(tdir)
      except checkpoint.DamagedCheckpointError as e:
        # Resuming the teacher's run moves the damaged step aside.
        logging.warning("%s", e)
        finished = False
    if not finished:
      if before_training is not None:
        before_training(*untrained_teacher(t.job))
      logging.info("Training the teacher in %s", tdir)
      train_teacher(t.job, tdir)
      restored = checkpoint.restore(tdir)
    differences = config_differences(restored.meta["config"],
                                     checkpoint.config_to_json(t.job))
    if differences:
      raise ValueError(
          f"The teacher in {tdir} was trained with other settings than "
          f"teacher.job: {'; '.join(differences[:8])}. Point "
          "--config.teacher.workdir at a new directory to train this "
          "teacher, or set teacher.job to the settings it was trained with.")
    return restored.model, restored.variables
  if t.source == "checkpoint":
    if not t.path:
      raise ValueError(
          "teacher.source='checkpoint' needs teacher.path, the --workdir of "
          "the finished run to use as the teacher: add "
          "--config.teacher.path=DIR.")
    restored = checkpoint.restore(t.path)
    return restored.model, restored.variables
  if t.source == "torchvision":
    from ot_transfer_jax.models import pretrained
    if not os.path.isfile(t.path):
      raise FileNotFoundError(
          f"teacher.path={t.path!r}: no such file. Save torchvision's "
          f"ImageNet {t.name} weights as safetensors on a machine with "
          "internet (docs/usage.md, 'Models and representation capture') "
          "and point --config.teacher.path at the file.")
    variables = pretrained.load_torchvision_resnet(t.path, t.name)
    num_classes = variables["params"]["head"]["kernel"].shape[-1]
    return models.create_model(t.name, num_classes, **t.kwargs), variables
  if t.source == "random":
    if not t.image_shape:
      raise ValueError("teacher.source='random' needs teacher.image_shape "
                       "(H, W, C) to initialise the network.")
    teacher = models.create_model(t.name, t.num_classes, **t.kwargs)
    return teacher, train.init_model(teacher, jax.random.PRNGKey(0),
                                     jnp.zeros((1, *t.image_shape)))
  raise ValueError(f"teacher.source={t.source!r} is not one of ('none', "
                   "'train', 'checkpoint', 'torchvision', 'random').")


def untrained_teacher(job_config) -> tuple[Any, Any]:
  """``(model, variables)`` of the network a teacher job trains, at its
  random initialisation: what checks of the student need, without training."""
  tds = data.get_datasets(job_config.data)
  teacher = models.create_model(job_config.model.name, tds.num_classes,
                                **job_config.model.kwargs)
  return teacher, train.init_model(teacher, jax.random.PRNGKey(0),
                                   jnp.zeros((1, *tds.image_shape)))


# Settings a resume may change: they do not change what the steps already
# taken computed, nor the data, model or method they describe. Any other
# difference is another run (prefixes of dotted config keys).
_RUN_SETTINGS = (
    "log_every", "eval_every", "checkpoint_every", "max_to_keep",
    "eval_batch_size", "analysis", "data.data_dir", "loss.max_bad_steps",
    "allow_resume_with_changes", "method_order", "baseline_method",
    "vary_data_seed", "max_devices")
RESUMABLE_CHANGES = (
    "num_steps", *_RUN_SETTINGS, "teacher.workdir",
    # The same settings of the teacher's job; not its num_steps: a longer
    # teacher job trains the cached teacher on, so a different teacher.
    *(f"teacher.job.{key}" for key in _RUN_SETTINGS))


def _flatten(tree: Any, prefix: str = "") -> dict:
  if isinstance(tree, dict) and tree:
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(saved: dict, now: dict) -> list[str]:
  """``["key: saved -> now", ...]`` for the settings that make two JSON
  configs different runs (everything but ``RESUMABLE_CHANGES``)."""
  saved, now = _flatten(saved), _flatten(now)
  harmless = lambda key: any(key == p or key.startswith(p + ".")
                             for p in RESUMABLE_CHANGES)
  missing = "(unset)"
  return [f"{key}: {saved.get(key, missing)!r} -> {now.get(key, missing)!r}"
          for key in sorted(saved.keys() | now.keys())
          if not harmless(key) and saved.get(key, missing) != now.get(
              key, missing)]


def setup(config: ml_collections.ConfigDict, workdir: str,
          train_teacher: Callable) -> Job:
  """Data, teacher, student state, optimizer and compiled steps of a run.

  Args:
    train_teacher: ``(teacher_config, teacher_workdir) -> Any``, called when
      ``teacher.source='train'`` and the teacher run is not finished.

  Raises:
    ValueError: a config the run cannot use (unknown layer or option, a term
      without a teacher, ...), before any training step.
  """
  os.makedirs(workdir, exist_ok=True)
  ds = data.get_datasets(config.data)
  model = models.create_model(config.model.name, ds.num_classes,
                              **config.model.kwargs)
  mean, std = normalization(config, ds)
  sample = jnp.zeros((config.batch_size, *ds.image_shape), jnp.float32)
  rng = jax.random.PRNGKey(config.seed)
  tx = train.make_optimizer(config.optimizer, config.num_steps)
  # The largest device set the batch divides over: exact on any device count.
  mesh = train.make_mesh(batch_size=config.batch_size,
                         max_devices=config.max_devices)
  training_sample = _training_sample(ds, mean, std, config)

  def student_state(teacher, teacher_vars):
    init_vars = None
    if config.init_from_teacher:
      fresh = train.init_model(model, jax.random.fold_in(rng, 1), sample[:1])
      init_vars = train.transfer_init(fresh, teacher_vars)
    context = regularizers.Context(teacher=teacher, teacher_vars=teacher_vars,
                                   **training_sample)
    return train.create_train_state(config, model, teacher, teacher_vars, rng,
                                    sample, tx, init_variables=init_vars,
                                    context=context)

  def check(teacher, teacher_vars):
    """Everything about the student and its loss, against an untrained
    teacher of the right architecture (terms' init may read its features)."""
    _check_teacher_needed(config, teacher)
    if teacher is None:
      return
    state = student_state(teacher, teacher_vars)
    _check_analysis_layers(config, model, state.variables, teacher,
                           teacher_vars, sample[:1])
    # Tracing one step checks what only the step reads (e.g. OT options).
    batch = {"image": jax.ShapeDtypeStruct(sample.shape, jnp.float32),
             "label": jax.ShapeDtypeStruct(sample.shape[:1], jnp.int32)}
    jax.eval_shape(train.make_train_step(config, model, teacher, tx, mesh),
                   state, teacher_vars, batch)

  teacher, teacher_vars = load_teacher(config, workdir, train_teacher,
                                       before_training=check)
  _check_teacher_needed(config, teacher)
  state = student_state(teacher, teacher_vars)
  if teacher is not None:
    _check_analysis_layers(config, model, state.variables, teacher,
                           teacher_vars, sample[:1])
  state, teacher_vars = train.replicate((state, teacher_vars), mesh)
  return Job(config=config, workdir=workdir, ds=ds, model=model,
             teacher=teacher, teacher_vars=teacher_vars, mesh=mesh, tx=tx,
             initial_state=state,
             train_step=train.make_train_step(config, model, teacher, tx, mesh),
             eval_step=train.make_eval_step(model, mesh), mean=mean, std=std)


def _check_teacher_needed(config, teacher) -> None:
  if teacher is None and train.needs_teacher(config):
    uses = [f"loss.terms.{name}" for name in config.loss.terms]
    uses += ["init_from_teacher"] if config.init_from_teacher else []
    raise ValueError(
        f"{' and '.join(uses)} needs a teacher, but teacher.source='none'. "
        "Set teacher.source to 'train', 'checkpoint' or 'torchvision'.")


def _check_analysis_layers(config, model, variables, teacher, teacher_vars,
                           sample) -> None:
  """Checked before training, not after hours of it."""
  if not config.analysis.layers:
    return
  for name, net, net_vars in (("student", model, variables),
                              ("teacher", teacher, teacher_vars)):
    try:
      validate_layers(net, net_vars, sample, config.analysis.layers)
    except ValueError as e:
      raise ValueError(f"analysis.layers, in the {name}: {e}") from None


# Training images a term's init may read (DELTA): enough for a linear head.
TRAINING_SAMPLE = 512


def _training_sample(ds, mean, std, config) -> dict:
  """``{"images", "labels", "num_classes"}`` for terms whose ``init`` reads
  data (e.g. DELTA): the first ``TRAINING_SAMPLE / num_classes`` training
  images of every class (all of a small training set), in index order,
  normalised; no images when no term needs them."""
  terms = regularizers.terms_from_config(config.loss.terms)
  if not any(t.regularizer.needs_data for t in terms):
    return {"num_classes": ds.num_classes}
  labels = np.asarray(ds.train.labels)
  per_class = -(-TRAINING_SAMPLE // ds.num_classes)
  keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class]
                                 for c in range(ds.num_classes)]))
  subset = data.SubsetSource(ds.train, keep, np.arange(ds.num_classes))
  batch = next(data.eval_batches(subset, batch_size=len(keep),
                                 image_size=config.data.image_size,
                                 mean=mean, std=std))
  return {"images": batch["image"][batch["mask"]],
          "labels": batch["label"][batch["mask"]],
          "num_classes": ds.num_classes}
