"""Training state, loss composition and the data-parallel train/eval steps.

A frozen teacher and a trainable student see the same global batch. The loss
is a pure function of the student's trainable parameters::

  CE(student(x), y)                                 task loss (label smoothing)
  + weight * sum_l w_l * R(student_l(x), teacher_l(x))   R = Omega_P, Omega_I, AT, FitNets
  + kd_weight * KD(student(x), teacher(x))
  + weight_decay * ||theta_backbone||^2 / 2         L2
  + l2_sp * ||theta_backbone - theta^0||^2 / 2      L2-SP (theta^0: the teacher)
  + head_decay * ||theta_head||^2 / 2

The step is written for the *global* batch and compiled once with ``jax.jit``
over a device :class:`~jax.sharding.Mesh`: the batch is sharded along the
``"data"`` axis, the state is replicated, and XLA inserts the collectives. So
BatchNorm statistics and every layer's OT problem are computed over the global
batch, and results do not depend on the number of devices (or hosts).

Config (``ml_collections.ConfigDict``, see ``experiments/configs``)::

  model:     name, kwargs, freeze_batchnorm  the student (create_model)
  teacher:   name, kwargs, num_classes       the frozen network
  num_classes
  loss:      method ('none' | 'ot' | 'feature_matching' | 'attention' |
             'fitnets'), weight, student_layers, teacher_layers,
             layer_weights (None: all 1), ot (solve_neuron_ot options +
             warm_start), kd_weight, kd_temperature, label_smoothing,
             weight_decay, l2_sp, head_decay, max_bad_steps
  optimizer: name ('sgd' | 'adamw'), learning_rate, momentum, nesterov,
             adamw_weight_decay, schedule ('cosine' | 'step' | 'constant'),
             warmup_steps, step_boundaries (fractions of training),
             step_factor, backbone_lr_multiplier
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ot_transfer_jax import losses, ot
from ot_transfer_jax.features import apply_with_features, validate_layers

PyTree = Any
Batch = Mapping[str, jax.Array]

METHODS = ("none", "ot", "feature_matching", "attention", "fitnets")
HEAD = "head"


@struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree, checkpointed whole).

  Attributes:
    step: scalar int32, optimizer steps taken (skipped bad steps included).
    params: the student's parameters.
    hint_params: FitNets regressors ``{layer: Dense params}`` (else ``{}``).
    batch_stats: the student's BatchNorm statistics (``{}`` without BN).
    opt_state: optax state of ``{"model": params, "hint": hint_params}``.
    rng: PRNG key; the step's key is ``fold_in(rng, step)``, so a resumed run
      draws the same randomness.
    ot_potentials: ``{layer: (f, g)}`` Sinkhorn potentials of the last step,
      warm-starting the next one (zeros at step 0: a valid start, without
      the epsilon scaling of a true cold start, so step 0 takes more
      iterations).
    bad_steps: scalar int32, consecutive steps skipped for a non-finite loss
      or gradient.
  """

  step: jax.Array
  params: PyTree
  hint_params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array
  ot_potentials: PyTree
  bad_steps: jax.Array

  @property
  def variables(self) -> dict:
    """The student's ``{"params", "batch_stats"}`` for ``model.apply``."""
    return model_variables(self.params, self.batch_stats)


def model_variables(params: PyTree, batch_stats: PyTree) -> dict:
  """``{"params": ..., "batch_stats": ...}``, dropping an empty collection."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


# ---------------------------------------------------------------------------
# Layers and regularizers
# ---------------------------------------------------------------------------


def layer_pairs(loss_cfg) -> Tuple[Tuple[str, str, float], ...]:
  """``((student_layer, teacher_layer, weight), ...)`` from the loss config."""
  method = loss_cfg.method
  if method not in METHODS:
    raise ValueError(f"loss.method={method!r} is not one of {METHODS}.")
  if method == "none":
    return ()
  s_layers = tuple(loss_cfg.student_layers)
  t_layers = tuple(loss_cfg.teacher_layers or s_layers)
  weights = loss_cfg.get("layer_weights") or (1.0,) * len(s_layers)
  if not (len(s_layers) == len(t_layers) == len(weights)) or not s_layers:
    raise ValueError(
        "loss.student_layers, loss.teacher_layers and loss.layer_weights must "
        f"be non-empty and of equal length; got {s_layers}, {t_layers}, "
        f"{tuple(weights)}.")
  return tuple(zip(s_layers, t_layers, (float(w) for w in weights)))


def unique_layers(pairs) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
  """The distinct student and teacher layers of ``layer_pairs``, in order."""
  return (tuple(dict.fromkeys(p[0] for p in pairs)),
          tuple(dict.fromkeys(p[1] for p in pairs)))


def needs_teacher(config) -> bool:
  """Whether the loss or the initialisation reads the teacher."""
  return (bool(layer_pairs(config.loss)) or config.loss.kd_weight > 0
          or config.loss.l2_sp > 0 or config.get("init_from_teacher", False))


def init_model(model: nn.Module, rng: jax.Array,
               sample_image: jax.Array) -> dict:
  """``model.init`` compiled: eager random initialisers are slow on CPU."""
  return jax.jit(functools.partial(model.init, train=False))(rng,
                                                             sample_image)


def _pair_key(student_layer: str, teacher_layer: str) -> str:
  return f"{student_layer}->{teacher_layer}"


def ot_options(loss_cfg) -> dict:
  """``solve_neuron_ot`` keywords of ``loss.ot`` (without ``warm_start``)."""
  options = dict(loss_cfg.ot)
  options.pop("warm_start", None)
  return options


def check_layer_shapes(config, feature_shapes: Mapping[str, Tuple[Tuple[int, ...],
                                                                 Tuple[int, ...]]]):
  """Raises a clear ``ValueError`` when a method cannot compare two layers.

  Args:
    feature_shapes: ``{pair_key: (student_shape, teacher_shape)}``.
  """
  method = config.loss.method
  for key, (s_shape, t_shape) in feature_shapes.items():
    try:
      if method == "ot":
        ot.check_activation_shapes(s_shape, t_shape,
                                   config.loss.ot.get("spatial", "flatten"))
      elif method == "feature_matching":
        options = {k: v for k, v in config.loss.ot.items()
                   if k in ("spatial", "normalize")}
        jax.eval_shape(functools.partial(losses.feature_matching, **options),
                       jax.ShapeDtypeStruct(s_shape, jnp.float32),
                       jax.ShapeDtypeStruct(t_shape, jnp.float32))
      elif method == "attention":
        jax.eval_shape(losses.attention_transfer,
                       jax.ShapeDtypeStruct(s_shape, jnp.float32),
                       jax.ShapeDtypeStruct(t_shape, jnp.float32))
      elif method == "fitnets":
        ot.check_activation_shapes(s_shape, t_shape, "flatten")
    except ValueError as e:
      raise ValueError(f"loss.method={method!r} on layers {key}: {e}") from None


class HintRegressor(nn.Module):
  """FitNets regressor: a 1x1 convolution (dense on the neuron axis).

  ``(m, *positions, n_s) -> (m, *positions, n_t)``.
  """

  features: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, use_bias=False)(x.astype(jnp.float32))


def init_hint_params(config, rng, feature_shapes) -> dict:
  """FitNets regressors for every regularised layer pair (else ``{}``)."""
  if config.loss.method != "fitnets":
    return {}
  params = {}
  for i, (key, (s_shape, t_shape)) in enumerate(sorted(feature_shapes.items())):
    params[key] = HintRegressor(t_shape[-1]).init(
        jax.random.fold_in(rng, i), jnp.zeros(s_shape, jnp.float32))["params"]
  return params


def init_ot_potentials(config, feature_shapes) -> dict:
  """Zero potentials for each OT-regularised layer pair (step 0)."""
  if config.loss.method != "ot":
    return {}
  return {
      key: (jnp.zeros((s[-1],), jnp.float32), jnp.zeros((t[-1],), jnp.float32))
      for key, (s, t) in feature_shapes.items()
  }


def regularizer_terms(config, s_feats, t_feats, hint_params, ot_potentials):
  """Per-layer regulariser values and statistics.

  Returns:
    ``(total, metrics, new_potentials)``: the weighted sum over layers, a
    dict of per-layer scalars, and the OT potentials for the next step.
  """
  loss_cfg = config.loss
  total = jnp.zeros((), jnp.float32)
  metrics, potentials = {}, {}
  warm = bool(loss_cfg.get("ot", {}).get("warm_start", True))
  for s_layer, t_layer, weight in layer_pairs(loss_cfg):
    key = _pair_key(s_layer, t_layer)
    s, t = s_feats[s_layer], t_feats[t_layer]
    if loss_cfg.method == "ot":
      res = ot.solve_neuron_ot(
          s, t, init=ot_potentials[key] if warm else None,
          **ot_options(loss_cfg))
      value = res.value
      potentials[key] = res.potentials
      metrics[f"matched_fraction/{key}"] = res.matched_fraction
      metrics[f"sinkhorn_iters/{key}"] = res.n_iters
      metrics[f"sinkhorn_converged/{key}"] = res.converged.astype(jnp.float32)
    elif loss_cfg.method == "feature_matching":
      value = losses.feature_matching(
          s, t, **{k: v for k, v in loss_cfg.ot.items()
                   if k in ("spatial", "normalize")})
    elif loss_cfg.method == "attention":
      value = losses.attention_transfer(s, t)
    elif loss_cfg.method == "fitnets":
      projected = HintRegressor(t.shape[-1]).apply({"params": hint_params[key]},
                                                   s)
      value = losses.fitnets_hint(projected, t)
    metrics[f"reg/{key}"] = value
    total = total + weight * value
  return total, metrics, potentials


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------


def split_head(params: Mapping[str, Any]) -> Tuple[dict, dict]:
  """``(backbone, head)`` parameters: the ``head`` module and the rest."""
  params = dict(params)
  head = params.pop(HEAD, {})
  return params, head


def make_loss_fn(config, model: nn.Module, teacher: nn.Module) -> Callable:
  """The training objective as a pure function (see the module docstring).

  Returns:
    ``loss_fn(trainable, batch_stats, teacher_vars, reference_params,
    ot_potentials, batch, rng) -> (loss, (metrics, new_batch_stats,
    new_potentials))`` where ``trainable = {"model": params, "hint": ...}``,
    ``batch = {"image": (B, H, W, C), "label": (B,)}`` (global batch) and
    ``reference_params`` is the L2-SP anchor (the teacher's backbone).
  """
  loss_cfg = config.loss
  pairs = layer_pairs(loss_cfg)
  s_layers, t_layers = unique_layers(pairs)
  need_teacher = bool(pairs) or loss_cfg.kd_weight > 0

  # Frozen BatchNorm (running statistics, as the teacher) is common when
  # fine-tuning on scarce data; then an unchanged student computes exactly
  # the teacher's function.
  bn_train = not config.model.get("freeze_batchnorm", False)

  def loss_fn(trainable, batch_stats, teacher_vars, reference_params,
              ot_potentials, batch, rng):
    params = trainable["model"]
    logits, s_feats, new_state = apply_with_features(
        model, model_variables(params, batch_stats), batch["image"], s_layers,
        train=bn_train, rngs={"dropout": rng})
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    labels = optax.smooth_labels(
        jax.nn.one_hot(batch["label"], num_classes), loss_cfg.label_smoothing)
    ce = jnp.mean(optax.softmax_cross_entropy(logits, labels))
    loss = ce
    metrics = {"ce": ce}

    if need_teacher:
      t_logits, t_feats, _ = apply_with_features(
          teacher, teacher_vars, batch["image"], t_layers, train=False)
      t_feats = jax.lax.stop_gradient(t_feats)
      t_logits = jax.lax.stop_gradient(t_logits)
    new_potentials = ot_potentials
    if pairs:
      reg, reg_metrics, new_potentials = regularizer_terms(
          config, s_feats, t_feats, trainable["hint"], ot_potentials)
      loss = loss + loss_cfg.weight * reg
      metrics.update(reg_metrics, reg=reg)
    if loss_cfg.kd_weight > 0:
      kd = losses.kd_loss(logits, t_logits, loss_cfg.kd_temperature)
      loss = loss + loss_cfg.kd_weight * kd
      metrics["kd"] = kd

    backbone, head = split_head(params)
    if loss_cfg.weight_decay > 0:
      loss = loss + loss_cfg.weight_decay * losses.l2(backbone)
    if loss_cfg.l2_sp > 0:
      sp = losses.l2_sp(backbone, reference_params, alpha=loss_cfg.l2_sp)
      loss = loss + sp
      metrics["l2_sp"] = sp
    if loss_cfg.head_decay > 0:
      loss = loss + loss_cfg.head_decay * losses.l2(head)

    metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    metrics["loss"] = loss
    return loss, (metrics, new_state.get("batch_stats", batch_stats),
                  new_potentials)

  return loss_fn


# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Learning rate per step: linear warmup, then cosine, step or constant."""
  lr, warmup = opt_cfg.learning_rate, int(opt_cfg.get("warmup_steps", 0))
  name = opt_cfg.get("schedule", "cosine")
  if name == "cosine":
    if warmup == 0:
      return optax.cosine_decay_schedule(lr, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)
  if name == "step":
    factors = {}
    for frac in opt_cfg.get("step_boundaries", (0.5, 0.75)):
      # Boundaries that round to one step (short runs) multiply there.
      # join_schedules restarts the count after the warmup: shift back.
      step = round(frac * total_steps) - warmup
      factors[step] = factors.get(step, 1.0) * opt_cfg.get("step_factor", 0.1)
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
  name = opt_cfg.get("name", "sgd")
  if name == "sgd":
    return optax.sgd(schedule, momentum=opt_cfg.get("momentum", 0.9),
                     nesterov=opt_cfg.get("nesterov", False))
  if name == "adamw":
    return optax.adamw(schedule,
                       weight_decay=opt_cfg.get("adamw_weight_decay", 0.0))
  raise ValueError(f"optimizer.name={name!r} is not one of ('sgd', 'adamw').")


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  """The optax optimizer of ``{"model": params, "hint": hint_params}``.

  With ``backbone_lr_multiplier != 1`` the pre-trained backbone gets that
  fraction of the learning rate of the new head and the FitNets regressors
  (``optax.multi_transform``). ``grad_clip_norm`` clips the global gradient
  norm first.
  """
  schedule = make_schedule(opt_cfg, total_steps)
  mult = float(opt_cfg.get("backbone_lr_multiplier", 1.0))
  if mult == 1.0:
    tx = _base_optimizer(opt_cfg, schedule)
  else:
    tx = _split_optimizer(opt_cfg, schedule, mult)
  clip = opt_cfg.get("grad_clip_norm")
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
        "hint": jax.tree_util.tree_map(lambda _: "head", trainable["hint"]),
    }

  return optax.multi_transform(
      {"head": _base_optimizer(opt_cfg, schedule),
       "backbone": _base_optimizer(opt_cfg, backbone_schedule)}, labels)


# ---------------------------------------------------------------------------
# State creation
# ---------------------------------------------------------------------------


def feature_shapes(config, model, variables, teacher, teacher_vars,
                   sample_image) -> dict:
  """``{pair_key: (student_shape, teacher_shape)}`` of the regularised layers.

  Validates the layer names first: an unknown path raises a ``ValueError``
  listing the available ones.
  """
  pairs = layer_pairs(config.loss)
  if not pairs:
    return {}
  s_layers, t_layers = unique_layers(pairs)
  for name, net, net_vars, layers in (("student", model, variables, s_layers),
                                      ("teacher", teacher, teacher_vars,
                                       t_layers)):
    try:
      validate_layers(net, net_vars, sample_image, layers)
    except ValueError as e:
      raise ValueError(f"In the {name} ({net.__class__.__name__}): {e}") from None
  s_feats = jax.eval_shape(
      lambda v, x: apply_with_features(model, v, x, s_layers, train=False)[1],
      variables, sample_image)
  t_feats = jax.eval_shape(
      lambda v, x: apply_with_features(teacher, v, x, t_layers, train=False)[1],
      teacher_vars, sample_image)
  shapes = {
      _pair_key(s, t): (tuple(s_feats[s].shape), tuple(t_feats[t].shape))
      for s, t, _ in pairs
  }
  check_layer_shapes(config, shapes)
  return shapes


def create_train_state(config, model, teacher, teacher_vars, rng,
                       sample_image, tx, init_variables=None) -> TrainState:
  """A fresh :class:`TrainState`.

  Args:
    sample_image: ``(B, H, W, C)`` with the training batch size, so that the
      regularised layers' shapes (and so the OT potentials) are known.
    init_variables: student variables to start from (transfer learning: the
      teacher's with a new head); ``None`` initialises at random.
  """
  init_rng, hint_rng, state_rng = jax.random.split(rng, 3)
  if init_variables is None:
    init_variables = init_model(model, init_rng, sample_image[:1])
  else:
    # The step donates the state: it must not alias the teacher's buffers.
    init_variables = jax.tree_util.tree_map(jnp.copy, init_variables)
  params = init_variables["params"]
  batch_stats = init_variables.get("batch_stats", {})
  shapes = feature_shapes(config, model, model_variables(params, batch_stats),
                          teacher, teacher_vars, sample_image)
  hint_params = init_hint_params(config, hint_rng, shapes)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      hint_params=hint_params,
      batch_stats=batch_stats,
      opt_state=tx.init({"model": params, "hint": hint_params}),
      rng=state_rng,
      ot_potentials=init_ot_potentials(config, shapes),
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
              batch_size: Optional[int] = None) -> Mesh:
  """A 1-D data-parallel mesh, axis ``"data"``.

  Args:
    devices: the devices to use (default: all global devices).
    batch_size: the global training batch size. When it does not divide over
      all devices, the mesh is the largest subset that it divides (with the
      same number of devices on each process), and a warning says so. A
      step on fewer devices computes exactly what it computes on one: no
      padding enters the loss, the BatchNorm statistics or the OT problems.
      E.g. a batch of 25 runs on 1 of 2 or 4 devices and on 5 of 8.
  """
  devices = list(jax.devices() if devices is None else devices)
  if batch_size is not None:
    used = data_parallel_devices(devices, batch_size)
    if len(used) < len(devices):
      logging.warning(
          "The global batch size %d does not divide over %d devices: the "
          "train step runs on %d of them (the most it divides over). Choose "
          "a batch size that is a multiple of %d to use them all.",
          batch_size, len(devices), len(used), len(devices))
    devices = used
  return Mesh(np.asarray(devices), ("data",))


def data_parallel_devices(devices: Sequence[jax.Device],
                          batch_size: int) -> list:
  """The largest subset of ``devices`` whose size divides ``batch_size``,
  with ``k`` devices from each process (each process feeds its own
  ``batch_size / process_count`` rows to its own devices).

  Raises:
    ValueError: the batch does not divide over the processes.
  """
  by_process: dict[int, list] = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)
  processes = len(by_process)
  per_process = min(len(v) for v in by_process.values())
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
  """``train_step(state, teacher_vars, reference_params, batch) -> (state, metrics)``.

  Jit-compiled once for the mesh; the state is donated. A step whose loss,
  gradient or update is not finite is skipped (the state is kept, ``step`` advances,
  ``bad_steps`` counts consecutive skips, ``metrics["skipped"] = 1``).
  """
  loss_fn = make_loss_fn(config, model, teacher)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, teacher_vars, reference_params, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    trainable = {"model": state.params, "hint": state.hint_params}
    (loss, (metrics, batch_stats, potentials)), grads = grad_fn(
        trainable, state.batch_stats, teacher_vars, reference_params,
        state.ot_potentials, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    grad_norm = optax.tree.norm(grads)
    update_norm = optax.tree.norm(updates)
    # A finite gradient can still overflow the update (huge learning rate).
    ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
          & jnp.isfinite(update_norm))
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_trainable["model"], state.params),
        hint_params=keep(new_trainable["hint"], state.hint_params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        ot_potentials=keep(potentials, state.ot_potentials),
        bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
    )
    metrics.update(
        grad_norm=grad_norm,
        param_norm=optax.tree.norm(state.params),
        update_norm=update_norm,
        skipped=(~ok).astype(jnp.float32),
    )
    return new_state, metrics

  replicated, data = _replicated(mesh), _batch_sharded(mesh)
  return jax.jit(train_step,
                 in_shardings=(replicated, replicated, replicated, data),
                 out_shardings=(replicated, replicated),
                 donate_argnums=(0,))


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
