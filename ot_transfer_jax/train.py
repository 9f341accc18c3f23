"""Training state, the loss and the train step.

A frozen teacher and a trainable student see the same global batch. The loss
is a pure function of the student's trainable parameters::

  CE(student(x), y)                          task loss (label smoothing)
  + sum_terms weight * sum_l w_l * R(...)    teacher-based terms (Omega_P,
                                             Omega_I, AT, FitNets, KD, L2-SP:
                                             :mod:`ot_transfer_jax.regularizers`)
  + weight_decay * ||theta_backbone||^2 / 2
  + head_decay * ||theta_head||^2 / 2

The step is written for the *global* batch and compiled once with ``jax.jit``
over a device mesh (:mod:`ot_transfer_jax.parallel`), so BatchNorm statistics
and every layer's OT problem are computed over the global batch. Every option
is an argument (the optimizer: :mod:`ot_transfer_jax.optim`)::

  terms = (regularizers.make_term("ot", "ot", weight=0.1,
                                  student_layers=("stage2",)),)
  loss_fn = train.make_loss_fn(model, teacher, terms, weight_decay=5e-4)
  tx = optim.make_optimizer(num_steps, learning_rate=0.05)
  state = train.create_train_state(model, teacher, teacher_vars, terms, rng,
                                   sample_image, tx)
  train_step = train.make_train_step(loss_fn, tx, mesh)
  state, metrics = train_step(state, teacher_vars, batch)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from ot_transfer_jax import losses, parallel, regularizers
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


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------


def make_loss_fn(model: nn.Module, teacher: Optional[nn.Module],
                 terms: Sequence[regularizers.Term], *,
                 label_smoothing: float = 0.0, weight_decay: float = 0.0,
                 head_decay: float = 0.0, bn_train: bool = True) -> Callable:
  """The training objective as a pure function (see the module docstring).

  Args:
    terms: the teacher-based loss terms
      (:func:`ot_transfer_jax.regularizers.make_term`).
    label_smoothing: of the cross-entropy's one-hot targets.
    weight_decay, head_decay: ``decay * ||theta||^2 / 2`` on the backbone
      and on the ``head``.
    bn_train: BatchNorm uses (and updates) the batch's statistics; False
      freezes it at its running statistics (as the teacher), common when
      fine-tuning on scarce data: an unchanged student then computes exactly
      the teacher's function.

  Returns:
    ``loss_fn(trainable, batch_stats, reg_state, teacher_vars, batch, rng) ->
    (loss, (metrics, new_batch_stats, new_reg_state))`` with ``trainable =
    {"model": params, "regularizers": reg_params}`` and ``batch = {"image":
    (B, H, W, C), "label": (B,)}`` (the global batch). ``metrics`` logs every
    term: ``loss = ce + sum_t weight_t * reg/<t> + weight_decay * l2 +
    head_decay * head_l2``.
  """
  s_layers, t_layers = regularizers.captured_layers(terms)
  run_teacher = any(t.reads in ("features", "logits") for t in terms)
  if terms and teacher is None:
    raise ValueError("loss.terms needs a teacher, but there is none.")
  decays = (("weight_decay", weight_decay), ("head_decay", head_decay))

  def loss_fn(trainable, batch_stats, reg_state, teacher_vars, batch, rng):
    params = trainable["model"]
    logits, s_feats, new_state = apply_with_features(
        model, model_variables(params, batch_stats), batch["image"], s_layers,
        train=bn_train, rngs={"dropout": rng})
    logits = logits.astype(jnp.float32)
    labels = optax.smooth_labels(jax.nn.one_hot(batch["label"],
                                                logits.shape[-1]),
                                 label_smoothing)
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
    for (name, decay), tree in zip(decays, (backbone, head)):
      if decay > 0:
        metrics[name] = decay * losses.l2(tree)
        loss = loss + metrics[name]
    metrics.update(loss=loss, accuracy=jnp.mean(
        jnp.argmax(logits, -1) == batch["label"]))
    return loss, (metrics, new_state.get("batch_stats", batch_stats),
                  new_reg_state)

  return loss_fn


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


def create_train_state(model: nn.Module, teacher: Optional[nn.Module],
                       teacher_vars: PyTree,
                       terms: Sequence[regularizers.Term], rng: jax.Array,
                       sample_image: jax.Array,
                       tx: optax.GradientTransformation, *,
                       init_variables: Optional[PyTree] = None,
                       context: Optional[regularizers.Context] = None
                       ) -> TrainState:
  """A fresh :class:`TrainState`; checks every loss term against the networks.

  Args:
    terms: the loss terms, as given to :func:`make_loss_fn`.
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


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    mesh: Mesh) -> Callable:
  """``train_step(state, teacher_vars, batch) -> (state, metrics)``.

  ``loss_fn`` from :func:`make_loss_fn`, ``tx`` the optimizer the state was
  created with; ``batch`` the global batch, sharded on ``mesh``
  (:func:`ot_transfer_jax.parallel.shard_batch`).

  Jit-compiled once for the mesh; the state is donated. A step whose loss,
  gradient or update is not finite is skipped (the state is kept, ``step``
  advances, ``bad_steps`` counts consecutive skips, ``metrics["skipped"] = 1``).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

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

  replicated, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(train_step, in_shardings=(replicated, replicated, data),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
