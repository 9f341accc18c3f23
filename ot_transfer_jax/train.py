"""Training state, the loss and the data-parallel train/eval steps.

A frozen teacher and a trainable student see the same global batch. The loss
is a pure function of the student's trainable parameters::

  CE(student(x), y)                          task loss (label smoothing)
  + sum_terms weight * sum_l w_l * R(...)    teacher-based terms (Omega_P,
                                             Omega_I, AT, FitNets, KD, L2-SP:
                                             :mod:`ot_transfer_jax.regularizers`)
  + weight_decay * ||theta_backbone||^2 / 2
  + head_decay * ||theta_head||^2 / 2

The step is written for the *global* batch and compiled once with ``jax.jit``
over a device :class:`~jax.sharding.Mesh`: the batch is sharded along the
``"data"`` axis, the state is replicated, and XLA inserts the collectives. So
BatchNorm statistics and every layer's OT problem are computed over the global
batch, and results do not depend on the number of devices (or hosts).

Config keys read here (``experiments/configs/common.py`` lists them all):
``model.freeze_batchnorm``, ``loss`` (``terms``, ``label_smoothing``,
``weight_decay``, ``head_decay``) and ``optimizer``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ot_transfer_jax import losses, regularizers
from ot_transfer_jax.features import apply_with_features, validate_layers
from ot_transfer_jax.regularizers import HEAD, split_head

PyTree = Any
Batch = Mapping[str, jax.Array]


@struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree, checkpointed whole).

  Attributes:
    step: scalar int32, optimizer steps taken (skipped bad steps included).
    params: the student's parameters.
    batch_stats: the student's BatchNorm statistics (``{}`` without BN).
    reg_params: the loss terms' trainable parameters, ``{term: {key: ...}}``
      (FitNets' regressors; ``{}`` leaves for the others).
    reg_state: the loss terms' state, ``{term: {key: ...}}``, e.g. Omega_P's
      Sinkhorn potentials of the last step, warm-starting the next solve.
    opt_state: optax state of ``{"model": params, "regularizers": reg_params}``.
    rng: PRNG key; the step's key is ``fold_in(rng, step)``, so a resumed run
      draws the same randomness.
    bad_steps: scalar int32, consecutive steps skipped for a non-finite loss
      or gradient.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  reg_params: PyTree
  reg_state: PyTree
  opt_state: PyTree
  rng: jax.Array
  bad_steps: jax.Array

  @property
  def variables(self) -> dict:
    """The student's ``{"params", "batch_stats"}`` for ``model.apply``."""
    return model_variables(self.params, self.batch_stats)

  @property
  def trainable(self) -> dict:
    """What the optimizer updates."""
    return {"model": self.params, "regularizers": self.reg_params}


def model_variables(params: PyTree, batch_stats: PyTree) -> dict:
  """``{"params": ..., "batch_stats": ...}``, dropping an empty collection."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


def init_model(model: nn.Module, rng: jax.Array,
               sample_image: jax.Array) -> dict:
  """``model.init`` compiled: eager random initialisers are slow on CPU."""
  return jax.jit(functools.partial(model.init, train=False))(rng,
                                                             sample_image)


def needs_teacher(config) -> bool:
  """Whether the loss or the initialisation reads the teacher."""
  return bool(config.loss.terms) or config.init_from_teacher


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------


def make_loss_fn(config, model: nn.Module,
                 teacher: Optional[nn.Module]) -> Callable:
  """The training objective as a pure function (see the module docstring).

  Returns:
    ``loss_fn(trainable, batch_stats, reg_state, teacher_vars, batch, rng) ->
    (loss, (metrics, new_batch_stats, new_reg_state))`` with ``trainable =
    {"model": params, "regularizers": reg_params}`` and ``batch = {"image":
    (B, H, W, C), "label": (B,)}`` (the global batch). ``metrics`` logs every
    term: ``loss = ce + sum_t weight_t * reg/<t> + weight_decay * l2 +
    head_decay * head_l2``.
  """
  loss_cfg = config.loss
  terms = regularizers.terms_from_config(loss_cfg.terms)
  s_layers, t_layers = regularizers.captured_layers(terms)
  run_teacher = any(t.reads in ("features", "logits") for t in terms)
  if terms and teacher is None:
    raise ValueError("loss.terms needs a teacher, but there is none.")
  # Frozen BatchNorm (running statistics, as the teacher) is common when
  # fine-tuning on scarce data; then an unchanged student computes exactly
  # the teacher's function.
  bn_train = not config.model.freeze_batchnorm

  def loss_fn(trainable, batch_stats, reg_state, teacher_vars, batch, rng):
    params = trainable["model"]
    logits, s_feats, new_state = apply_with_features(
        model, model_variables(params, batch_stats), batch["image"], s_layers,
        train=bn_train, rngs={"dropout": rng})
    logits = logits.astype(jnp.float32)
    labels = optax.smooth_labels(jax.nn.one_hot(batch["label"],
                                                logits.shape[-1]),
                                 loss_cfg.label_smoothing)
    ce = jnp.mean(optax.softmax_cross_entropy(logits, labels))
    backbone, head = split_head(params)
    views = {}
    if run_teacher:
      t_logits, t_feats, _ = jax.lax.stop_gradient(apply_with_features(
          teacher, teacher_vars, batch["image"], t_layers, train=False))
      views.update(features=(s_feats, t_feats), logits=(logits, t_logits))
    if terms:
      views["params"] = (backbone, jax.lax.stop_gradient(
          split_head(teacher_vars["params"])[0]))
    metrics, new_reg_state = regularizers.apply_terms(
        terms, trainable["regularizers"], reg_state, views)
    loss = ce
    for term in terms:
      loss = loss + term.weight * metrics[f"reg/{term.name}"]
    metrics["ce"] = ce
    for name, tree in (("weight_decay", backbone), ("head_decay", head)):
      if loss_cfg[name] > 0:
        metrics[name] = loss_cfg[name] * losses.l2(tree)
        loss = loss + metrics[name]
    metrics.update(loss=loss, accuracy=jnp.mean(
        jnp.argmax(logits, -1) == batch["label"]))
    return loss, (metrics, new_state.get("batch_stats", batch_stats),
                  new_reg_state)

  return loss_fn


# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Learning rate per step: linear warmup, then cosine, step or constant."""
  lr, warmup = opt_cfg.learning_rate, int(opt_cfg.warmup_steps)
  name = opt_cfg.schedule
  if name == "cosine":
    if warmup == 0:
      return optax.cosine_decay_schedule(lr, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)
  if name == "step":
    factors = {}
    for frac in opt_cfg.step_boundaries:
      # Boundaries that round to one step (short runs) multiply there.
      # join_schedules restarts the count after the warmup: shift back.
      step = round(frac * total_steps) - warmup
      factors[step] = factors.get(step, 1.0) * opt_cfg.step_factor
    main = optax.piecewise_constant_schedule(lr, factors)
  elif name == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optimizer.schedule={name!r} is not one of "
                     "('cosine', 'step', 'constant').")
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _base_optimizer(opt_cfg, schedule) -> optax.GradientTransformation:
  if opt_cfg.name != "sgd":
    raise ValueError(f"optimizer.name={opt_cfg.name!r}: only 'sgd' (with "
                     "optimizer.momentum) is implemented.")
  return optax.sgd(schedule, momentum=opt_cfg.momentum)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  """The optax optimizer of ``{"model": params, "regularizers": reg_params}``.

  With ``backbone_lr_multiplier != 1`` the pre-trained backbone gets that
  fraction of the learning rate of the new head and the terms' parameters
  (``optax.multi_transform``). ``grad_clip_norm`` clips the global gradient
  norm first.
  """
  schedule = make_schedule(opt_cfg, total_steps)
  mult = float(opt_cfg.backbone_lr_multiplier)
  if mult == 1.0:
    tx = _base_optimizer(opt_cfg, schedule)
  else:
    tx = _split_optimizer(opt_cfg, schedule, mult)
  clip = opt_cfg.grad_clip_norm
  if clip:
    # Clipping the global norm first keeps one bad batch from blowing up a
    # fine-tuned network (e.g. with frozen BatchNorm statistics).
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx


def _split_optimizer(opt_cfg, schedule, mult) -> optax.GradientTransformation:
  """The head and regressors at ``schedule``, the backbone at ``mult`` x it."""
  backbone_schedule = lambda step: mult * schedule(step)

  def labels(trainable):
    def label_model(path, _):
      return "head" if path[0].key == HEAD else "backbone"
    return {
        "model": jax.tree_util.tree_map_with_path(label_model,
                                                  trainable["model"]),
        "regularizers": jax.tree_util.tree_map(lambda _: "head",
                                               trainable["regularizers"]),
    }

  return optax.multi_transform(
      {"head": _base_optimizer(opt_cfg, schedule),
       "backbone": _base_optimizer(opt_cfg, backbone_schedule)}, labels)


# ---------------------------------------------------------------------------
# State creation
# ---------------------------------------------------------------------------


def _feature_shapes(net, variables, sample_image, layers, who):
  """``{layer: ShapeDtypeStruct}`` of ``net``'s activations at ``layers``."""
  try:
    validate_layers(net, variables, sample_image[:1], layers)
  except ValueError as e:
    raise ValueError(f"In the {who} ({net.__class__.__name__}): {e}") from None
  return jax.eval_shape(
      lambda v, x: apply_with_features(net, v, x, layers, train=False)[1],
      variables, sample_image)


def create_train_state(config, model, teacher, teacher_vars, rng,
                       sample_image, tx, init_variables=None,
                       context: Optional[regularizers.Context] = None
                       ) -> TrainState:
  """A fresh :class:`TrainState`; checks every loss term against the networks.

  Args:
    sample_image: ``(B, H, W, C)`` with the training batch size, so that the
      regularised layers' shapes (and so the OT potentials) are known.
    init_variables: student variables to start from (transfer learning: the
      teacher's with a new head); ``None`` initialises at random.
    context: what the terms' ``init`` may read (e.g. training images).

  Raises:
    ValueError: an unknown layer (listing the available ones), a term that
      cannot compare its layers, or a bad term option.
  """
  init_rng, reg_rng, state_rng = jax.random.split(rng, 3)
  if init_variables is None:
    init_variables = init_model(model, init_rng, sample_image[:1])
  else:
    # The step donates the state: it must not alias the teacher's buffers.
    init_variables = jax.tree_util.tree_map(jnp.copy, init_variables)
  params = init_variables["params"]
  batch_stats = init_variables.get("batch_stats", {})
  terms = regularizers.terms_from_config(config.loss.terms)
  views = {}
  if terms:
    s_layers, t_layers = regularizers.captured_layers(terms)
    abstract = lambda tree: jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)
    s_logits = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False),
        model_variables(params, batch_stats), sample_image)
    t_logits = jax.eval_shape(lambda v, x: teacher.apply(v, x, train=False),
                              teacher_vars, sample_image)
    views = {
        "features": (_feature_shapes(model, model_variables(params, batch_stats),
                                     sample_image, s_layers, "student"),
                     _feature_shapes(teacher, teacher_vars, sample_image,
                                     t_layers, "teacher")),
        "logits": (s_logits, t_logits),
        "params": (abstract(split_head(params)[0]),
                   abstract(split_head(teacher_vars["params"])[0])),
    }
  context = context or regularizers.Context(teacher=teacher,
                                            teacher_vars=teacher_vars)
  reg_params, reg_state = regularizers.init_terms(terms, reg_rng, views,
                                                  context)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      reg_params=reg_params,
      reg_state=reg_state,
      opt_state=tx.init({"model": params, "regularizers": reg_params}),
      rng=state_rng,
      bad_steps=jnp.zeros((), jnp.int32),
  )


def transfer_init(student_init: Mapping[str, Any],
                  teacher_vars: Mapping[str, Any],
                  reinit: Sequence[str] = (HEAD,)) -> dict:
  """Student variables copied from the teacher, except fresh ``reinit`` modules.

  For transfer learning with the same architecture and a new label space:
  the new ``head`` always keeps its fresh initialisation; more top-level
  modules (e.g. ``("stage3", "head")``) may be re-initialised too.

  Raises:
    ValueError: when the copied parts differ, naming the first mismatch.
  """
  reinit = set(reinit) | {HEAD}
  out = {}
  for col, tree in student_init.items():
    ours = {k: v for k, v in tree.items() if k not in reinit}
    theirs = {k: v for k, v in teacher_vars.get(col, {}).items()
              if k not in reinit}
    s_flat = flax.traverse_util.flatten_dict(ours, sep="/")
    t_flat = flax.traverse_util.flatten_dict(theirs, sep="/")
    if s_flat.keys() != t_flat.keys():
      missing = sorted(s_flat.keys() ^ t_flat.keys())[:5]
      raise ValueError(
          "Transfer initialisation needs the student to share the teacher's "
          f"architecture, but the {col!r} collections differ at {missing}.")
    for k in s_flat:
      if s_flat[k].shape != t_flat[k].shape:
        raise ValueError(
            f"Transfer initialisation: {col}/{k} has shape {s_flat[k].shape} "
            f"in the student and {t_flat[k].shape} in the teacher.")
    out[col] = {**theirs, **{k: v for k, v in tree.items() if k in reinit}}
  return out


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------


def make_mesh(devices: Optional[Sequence[jax.Device]] = None, *,
              batch_size: Optional[int] = None,
              max_devices: Optional[int] = None) -> Mesh:
  """A 1-D data-parallel mesh, axis ``"data"``.

  Args:
    devices: the devices to use (default: all global devices).
    batch_size: the global training batch size. When it does not divide over
      all devices, the mesh is the largest subset that it divides (with the
      same number of devices on each process), and a warning says so. A
      step on fewer devices computes exactly what it computes on one: no
      padding enters the loss, the BatchNorm statistics or the OT problems.
      E.g. a batch of 25 runs on 1 of 2 or 4 devices and on 5 of 8.
    max_devices: use at most this many devices (None or 0: no limit; at
      least one per process). Data
      parallelism sums partial results in a device-count-dependent order, so
      only a fixed device count gives bit-identical runs on any machine.
  """
  devices = list(jax.devices() if devices is None else devices)
  if batch_size is not None:
    used = data_parallel_devices(devices, batch_size, max_devices)
    if len(used) < len(devices):
      if max_devices and len(used) == max_devices:
        logging.info("Training on %d of the %d devices (max_devices=%d).",
                     len(used), len(devices), max_devices)
      else:
        logging.warning(
            "The global batch size %d does not divide over %d devices: the "
            "train step runs on %d of them (the most it divides over). "
            "Choose a batch size that is a multiple of %d to use them all.",
            batch_size, len(devices), len(used), len(devices))
    devices = used
  return Mesh(np.asarray(devices), ("data",))


def data_parallel_devices(devices: Sequence[jax.Device], batch_size: int,
                          max_devices: Optional[int] = None) -> list:
  """The largest subset of ``devices`` (at most ``max_devices``) whose size
  divides ``batch_size``, with ``k`` devices from each process (each process
  feeds its own ``batch_size / process_count`` rows to its own devices).

  With several processes, ``max_devices`` below their number still gives
  each process one device.

  Raises:
    ValueError: the batch does not divide over the processes, or a negative
      ``max_devices``.
  """
  if max_devices is not None and max_devices < 0:
    raise ValueError(f"max_devices={max_devices}: use 0 (every device the "
                     "batch divides over) or a positive limit.")
  by_process: dict[int, list] = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)
  processes = len(by_process)
  per_process = min(len(v) for v in by_process.values())
  if max_devices:
    # Every process trains on its own rows: at least one device each.
    per_process = min(per_process, max(1, max_devices // processes))
  for k in range(per_process, 0, -1):
    if batch_size % (k * processes) == 0:
      return [d for p in sorted(by_process) for d in by_process[p][:k]]
  raise ValueError(
      f"The global batch size {batch_size} must be divisible by the "
      f"{processes} processes (each reads its own equal share); choose a "
      f"multiple of {processes}.")


def _replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (state, teacher)."""
  return NamedSharding(mesh, PartitionSpec())


def _batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over the ``"data"`` axis."""
  return NamedSharding(mesh, PartitionSpec("data"))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's rows of the global batch -> a global sharded array.

  Each process passes its own ``B / process_count`` rows; on one process this
  is the whole batch. The leading dimension must divide by the device count
  (``make_mesh(batch_size=B)`` picks a mesh it divides over).
  """
  sharding = _batch_sharded(mesh)
  n = mesh.devices.size
  out = {}
  for k, v in batch.items():
    global_rows = v.shape[0] * jax.process_count()
    if global_rows % n:
      raise ValueError(
          f"The global batch size {global_rows} must be divisible by the "
          f"{n} devices of the mesh; choose a batch size that is a multiple of "
          f"{n}, or build the mesh with train.make_mesh(batch_size=...).")
    out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
  return out


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a pytree on every device of the mesh (the state, the teacher)."""
  return jax.device_put(tree, _replicated(mesh))


def make_train_step(config, model, teacher, tx, mesh: Mesh) -> Callable:
  """``train_step(state, teacher_vars, batch) -> (state, metrics)``.

  Jit-compiled once for the mesh; the state is donated. A step whose loss,
  gradient or update is not finite is skipped (the state is kept, ``step``
  advances, ``bad_steps`` counts consecutive skips, ``metrics["skipped"] = 1``).
  """
  grad_fn = jax.value_and_grad(make_loss_fn(config, model, teacher),
                               has_aux=True)

  def train_step(state, teacher_vars, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, (metrics, batch_stats, reg_state)), grads = grad_fn(
        state.trainable, state.batch_stats, state.reg_state, teacher_vars,
        batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
    # A finite gradient can still overflow the update (huge learning rate).
    ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
          & jnp.isfinite(update_norm))
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(trainable["model"], state.params),
        reg_params=keep(trainable["regularizers"], state.reg_params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        reg_state=keep(reg_state, state.reg_state),
        bad_steps=jnp.where(ok, 0, state.bad_steps + 1))
    metrics.update(grad_norm=grad_norm, update_norm=update_norm,
                   param_norm=optax.tree.norm(state.params),
                   skipped=(~ok).astype(jnp.float32))
    return new_state, metrics

  replicated, data = _replicated(mesh), _batch_sharded(mesh)
  return jax.jit(train_step, in_shardings=(replicated, replicated, data),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_eval_step(model, mesh: Mesh) -> Callable:
  """``eval_step(variables, batch) -> {"correct", "loss", "count"}`` sums.

  ``batch`` may carry a boolean ``mask`` (padding rows of the last batch);
  summing, not averaging, keeps the metrics exact.
  """

  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    logits = logits.astype(jnp.float32)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, bool))
    mask = mask.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(ce * mask),
            "count": jnp.sum(mask)}

  replicated, data = _replicated(mesh), _batch_sharded(mesh)
  return jax.jit(eval_step, in_shardings=(replicated, data),
                 out_shardings=replicated)


def evaluate(eval_step: Callable, variables, batches, mesh: Mesh) -> dict:
  """Accuracy and mean loss over an iterable of (masked) host batches.

  A batch whose rows do not divide over this process's devices of the mesh
  is padded with masked-out rows: the sums, so the metrics, are unchanged.
  """
  totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  local_devices = max(1, mesh.devices.size // jax.process_count())
  for batch in batches:
    batch = pad_batch(batch, local_devices)
    out = jax.device_get(eval_step(variables, shard_batch(batch, mesh)))
    for k in totals:
      totals[k] += float(out[k])
  count = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / count,
          "loss": totals["loss"] / count, "count": totals["count"]}


def pad_batch(batch: Mapping[str, np.ndarray], multiple: int) -> dict:
  """``batch`` with zero rows appended up to a multiple of ``multiple`` rows,
  and a boolean ``mask`` (False on the added rows; kept if present)."""
  rows = len(next(iter(batch.values())))
  pad = -rows % multiple
  batch = dict(batch)
  if "mask" not in batch:
    batch["mask"] = np.ones((rows,), bool)
  if not pad:
    return batch
  return {k: np.concatenate([np.asarray(v),
                             np.zeros((pad, *np.shape(v)[1:]),
                                      np.asarray(v).dtype)])
          for k, v in batch.items()}
