"""Setting a run up: the teacher, then data, student, optimizer and steps, as one frozen ``Job``.

A run starts in three steps (:func:`experiments.loop.train_and_evaluate`):

1. :func:`load_teacher`; when a ``teacher.source='train'`` teacher is not
   trained yet, :func:`check_student` first checks the student's config
   against an :func:`untrained_teacher` (a typo must not cost the teacher's
   training time), then the loop trains the teacher;
2. :func:`setup` builds everything before the first step, top to bottom, and
   checks what can be checked there;
3. :mod:`experiments.loop` runs the steps.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from experiments import data, permutation, same_run, terms as config_terms
from ot_transfer_jax import (checkpoint, inference, models, optim, parallel,
                             regularizers, train)
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
    return parallel.evaluate(self.eval_step, variables,
                             self.eval_batches(source), self.mesh)


def normalization(config, ds, teacher: "Teacher") -> tuple[np.ndarray,
                                                           np.ndarray]:
  """Per-channel (mean, std) of the run's inputs: ImageNet's when
  ``config.imagenet_normalization`` (pretrained ImageNet teachers), the
  teacher's own (those it was trained with, from its checkpoint) when
  ``config.teacher_normalization``, else the training set's.

  Raises:
    ValueError: both options set, or a teacher whose statistics are unknown.
  """
  if config.imagenet_normalization and config.teacher_normalization:
    raise ValueError("imagenet_normalization and teacher_normalization are "
                     "both True: set one (a torchvision teacher's statistics "
                     "are ImageNet's).")
  if config.imagenet_normalization:
    return IMAGENET_MEAN, IMAGENET_STD
  if config.teacher_normalization:
    if teacher.mean is None:
      raise ValueError(
          "teacher_normalization=True needs a teacher with known input "
          "statistics (teacher.source 'train', 'checkpoint' or "
          f"'torchvision'), not {config.teacher.source!r}: set "
          "teacher_normalization=False.")
    return teacher.mean, teacher.std
  return ds.mean, ds.std


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The frozen network the loss and initialisation read; ``model`` is
  ``None`` (and ``variables`` empty) when the run has none."""

  model: Optional[Any]
  variables: Any
  #: The per-channel statistics its inputs were normalised with (from its
  #: checkpoint; ImageNet's for torchvision weights); None when unknown.
  mean: Optional[np.ndarray] = None
  std: Optional[np.ndarray] = None


def teacher_workdir(config, workdir: str) -> str:
  """Where a ``teacher.source='train'`` teacher trains (and is cached)."""
  return config.teacher.workdir or os.path.join(workdir, "teacher")


def load_teacher(config, workdir: str) -> Optional[Teacher]:
  """The run's teacher; ``None`` when ``teacher.source='train'`` and that
  teacher has not finished training (:func:`experiments.loop.ensure_teacher`
  then trains it).

  ``config.teacher.source``:
    ``"none"``: no teacher (training a teacher, or a plain baseline);
    ``"train"``: the finished run of ``config.teacher.job`` in
      ``config.teacher.workdir`` (default ``WORKDIR/teacher``): methods and
      seeds share one cached teacher; it must have been trained with
      ``teacher.job``'s settings;
    ``"checkpoint"``: restore the run in ``config.teacher.path``;
    ``"torchvision"``: ImageNet ResNet weights from the ``.safetensors`` file
      ``config.teacher.path`` (torchvision layout);
    ``"random"``: ``config.teacher.name`` at random initialisation, with
      ``config.teacher.num_classes`` classes (smoke tests, debugging).
  """
  t = config.teacher
  if t.source == "none":
    return Teacher(None, {})
  if t.source == "train":
    tdir = teacher_workdir(config, workdir)
    # Decided from the (shared) checkpoints, the same on every process.
    if not (os.path.isdir(checkpoint.checkpoint_dir(tdir)) and (
        checkpoint.make_manager(tdir, reading=True).latest_step()
        == t.job.num_steps)):
      return None
    try:
      restored = inference.restore(tdir)
    except checkpoint.DamagedCheckpointError as e:
      # Resuming the teacher's run moves the damaged step aside.
      logging.warning("%s", e)
      return None
    differences = same_run.resume_differences(
        restored.meta.config, checkpoint.config_to_json(t.job))
    if differences:
      raise ValueError(
          f"The teacher in {tdir} was trained with other settings than "
          f"teacher.job: {'; '.join(differences[:8])}. Point "
          "--config.teacher.workdir at a new directory to train this "
          "teacher, or set teacher.job to the settings it was trained with.")
    return Teacher(restored.model, restored.variables,
                   *_statistics(restored.meta))
  if t.source == "checkpoint":
    if not t.path:
      raise ValueError(
          "teacher.source='checkpoint' needs teacher.path, the --workdir of "
          "the finished run to use as the teacher: add "
          "--config.teacher.path=DIR.")
    restored = inference.restore(t.path)
    return Teacher(restored.model, restored.variables,
                   *_statistics(restored.meta))
  if t.source == "torchvision":
    from experiments import pretrained
    if not os.path.isfile(t.path):
      raise FileNotFoundError(
          f"teacher.path={t.path!r}: no such file. Save torchvision's "
          f"ImageNet {t.name} weights as safetensors on a machine with "
          "internet (docs/usage.md, 'Models and representation capture') "
          "and point --config.teacher.path at the file.")
    variables = pretrained.load_torchvision_resnet(t.path, t.name)
    num_classes = variables["params"]["head"]["kernel"].shape[-1]
    return Teacher(models.create_model(t.name, num_classes, **t.kwargs),
                   variables, IMAGENET_MEAN, IMAGENET_STD)
  if t.source == "random":
    if not t.image_shape:
      raise ValueError("teacher.source='random' needs teacher.image_shape "
                       "(H, W, C) to initialise the network.")
    teacher = models.create_model(t.name, t.num_classes, **t.kwargs)
    return Teacher(teacher, train.init_model(teacher, jax.random.PRNGKey(0),
                                             jnp.zeros((1, *t.image_shape))))
  raise ValueError(f"teacher.source={t.source!r} is not one of ('none', "
                   "'train', 'checkpoint', 'torchvision', 'random').")


def untrained_teacher(job_config) -> Teacher:
  """The network a teacher job trains, at its random initialisation: what
  :func:`check_student` needs, without training."""
  tds = data.get_datasets(job_config.data)
  teacher = models.create_model(job_config.model.name, tds.num_classes,
                                **job_config.model.kwargs)
  mean, std = normalization(job_config, tds, Teacher(None, {}))
  return Teacher(teacher, train.init_model(teacher, jax.random.PRNGKey(0),
                                           jnp.zeros((1, *tds.image_shape))),
                 mean, std)


def _statistics(meta) -> tuple[np.ndarray, np.ndarray]:
  return (np.asarray(meta.mean, np.float32), np.asarray(meta.std, np.float32))


def setup(config: ml_collections.ConfigDict, workdir: str,
          teacher: Teacher) -> Job:
  """Data, student state, optimizer and compiled steps of a run, around
  ``teacher`` (:func:`load_teacher`).

  Raises:
    ValueError: a config the run cannot use (unknown layer or option, a term
      without a teacher, ...), before any training step.
  """
  _check_teacher_needed(config, teacher.model)
  data.check_augment(config.augment, config.data.image_size)
  os.makedirs(workdir, exist_ok=True)
  ds = data.get_datasets(config.data)
  model = models.create_model(config.model.name, ds.num_classes,
                              **config.model.kwargs)
  mean, std = normalization(config, ds, teacher)
  sample = jnp.zeros((config.batch_size, *ds.image_shape), jnp.float32)
  rng = jax.random.PRNGKey(config.seed)
  terms = config_terms.terms_from_config(config.loss.terms)
  tx = optim.make_optimizer(config.num_steps, **config.optimizer)
  # The largest device set the batch divides over: exact on any device count.
  mesh = parallel.make_mesh(batch_size=config.batch_size,
                            max_devices=config.max_devices)
  init_vars = None
  if config.init_permuted and not config.init_from_teacher:
    raise ValueError("init_permuted=True permutes the teacher's weights the "
                     "student starts from: set init_from_teacher=True too.")
  if config.init_from_teacher:
    fresh = train.init_model(model, jax.random.fold_in(rng, 1), sample[:1])
    start = teacher.variables
    if config.init_permuted:
      start = permutation.permute_neurons(
          start, permutation.draw(jax.random.fold_in(rng, 2), start))
    init_vars = train.transfer_init(fresh, start)
  context = regularizers.Context(
      teacher=teacher.model, teacher_vars=teacher.variables,
      **_training_sample(ds, mean, std, config, terms))
  state = train.create_train_state(model, teacher.model, teacher.variables,
                                   terms, rng, sample, tx,
                                   init_variables=init_vars, context=context)
  if teacher.model is not None:
    _check_analysis_layers(config, model, state.variables, teacher.model,
                           teacher.variables, sample[:1])
  loss_fn = train.make_loss_fn(
      model, teacher.model, terms, label_smoothing=config.loss.label_smoothing,
      weight_decay=config.loss.weight_decay, head_decay=config.loss.head_decay,
      bn_train=not config.model.freeze_batchnorm)
  state, teacher_vars = parallel.replicate((state, teacher.variables), mesh)
  return Job(config=config, workdir=workdir, ds=ds, model=model,
             teacher=teacher.model, teacher_vars=teacher_vars, mesh=mesh,
             tx=tx, initial_state=state,
             train_step=train.make_train_step(loss_fn, tx, mesh),
             eval_step=parallel.make_eval_step(model, mesh), mean=mean, std=std)


def check_student(config: ml_collections.ConfigDict, workdir: str,
                  teacher: Teacher) -> None:
  """Builds the run around ``teacher`` (an untrained one of the right
  architecture, :func:`untrained_teacher`) and traces one step, so that a
  mistake in the student's config fails before the teacher trains.

  Raises:
    ValueError: as :func:`setup`, and what only the step reads (e.g. OT
      options).
  """
  job = setup(config, workdir, teacher)
  shape = (config.batch_size, *job.ds.image_shape)
  batch = {"image": jax.ShapeDtypeStruct(shape, jnp.float32),
           "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32)}
  jax.eval_shape(job.train_step, job.initial_state, job.teacher_vars, batch)


def _check_teacher_needed(config, teacher) -> None:
  if teacher is None and (config.loss.terms or config.init_from_teacher):
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


def _training_sample(ds, mean, std, config, terms) -> dict:
  """``{"images", "labels", "num_classes"}`` for terms whose ``init`` reads
  data (e.g. DELTA): the first ``TRAINING_SAMPLE / num_classes`` training
  images of every class (all of a small training set), in index order,
  normalised; no images when no term needs them."""
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
