"""The optimiser: SGD with momentum, learning-rate schedules, a slower backbone.

:func:`make_optimizer` returns the optax transformation of the trainable
pytree ``{"model": params, "regularizers": reg_params}`` (the student and the
loss terms' own parameters, e.g. FitNets' regressors), as
:func:`ot_transfer_jax.train.make_train_step` updates it. Every option is an
argument; ``experiments/`` passes its config's ``optimizer`` block::

  tx = optim.make_optimizer(total_steps, learning_rate=0.05, momentum=0.9,
                            schedule="cosine", warmup_steps=10)
"""

from __future__ import annotations

from typing import Sequence

import jax
import optax

from ot_transfer_jax.regularizers import HEAD

SCHEDULES = ("cosine", "step", "constant")


def make_schedule(learning_rate: float, total_steps: int, *,
                  schedule: str = "cosine", warmup_steps: int = 0,
                  step_boundaries: Sequence[float] = (0.5, 0.75),
                  step_factor: float = 0.1) -> optax.Schedule:
  """Learning rate per step: linear warmup, then cosine, step or constant.

  Args:
    schedule: ``"cosine"`` (to 0 at ``total_steps``), ``"step"`` (times
      ``step_factor`` at each fraction ``step_boundaries`` of
      ``total_steps``) or ``"constant"``.
    warmup_steps: linear warmup from 0 over this many steps first.
  """
  lr, warmup = learning_rate, int(warmup_steps)
  if schedule == "cosine":
    if warmup == 0:
      return optax.cosine_decay_schedule(lr, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)
  if schedule == "step":
    factors = {}
    for frac in step_boundaries:
      # Boundaries that round to one step (short runs) multiply there.
      # join_schedules restarts the count after the warmup: shift back.
      step = round(frac * total_steps) - warmup
      factors[step] = factors.get(step, 1.0) * step_factor
    main = optax.piecewise_constant_schedule(lr, factors)
  elif schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optimizer.schedule={schedule!r} is not one of "
                     f"{SCHEDULES}.")
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(total_steps: int, *, learning_rate: float,
                   momentum: float = 0.9, name: str = "sgd",
                   schedule: str = "cosine", warmup_steps: int = 0,
                   step_boundaries: Sequence[float] = (0.5, 0.75),
                   step_factor: float = 0.1,
                   backbone_lr_multiplier: float = 1.0,
                   grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
  """The optax optimizer of ``{"model": params, "regularizers": reg_params}``.

  Args:
    total_steps: the run's length (the schedules' horizon).
    learning_rate, schedule, warmup_steps, step_boundaries, step_factor: the
      schedule (:func:`make_schedule`).
    name, momentum: the base optimizer; only ``"sgd"`` (with momentum).
    backbone_lr_multiplier: when not 1, the pre-trained backbone gets that
      fraction of the learning rate of the new head and the terms' parameters
      (``optax.multi_transform``).
    grad_clip_norm: clips the global gradient norm first (0: no clipping).

  Raises:
    ValueError: an unknown optimizer or schedule name.
  """
  lr_schedule = make_schedule(learning_rate, total_steps, schedule=schedule,
                              warmup_steps=warmup_steps,
                              step_boundaries=step_boundaries,
                              step_factor=step_factor)
  base = lambda sched: _base_optimizer(name, momentum, sched)
  mult = float(backbone_lr_multiplier)
  if mult == 1.0:
    tx = base(lr_schedule)
  else:
    tx = _split_optimizer(base, lr_schedule, mult)
  if grad_clip_norm:
    # Clipping the global norm first keeps one bad batch from blowing up a
    # fine-tuned network (e.g. with frozen BatchNorm statistics).
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx


def _base_optimizer(name, momentum, schedule) -> optax.GradientTransformation:
  if name != "sgd":
    raise ValueError(f"optimizer.name={name!r}: only 'sgd' (with "
                     "optimizer.momentum) is implemented.")
  return optax.sgd(schedule, momentum=momentum)


def _split_optimizer(base, schedule, mult) -> optax.GradientTransformation:
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
      {"head": base(schedule), "backbone": base(backbone_schedule)}, labels)
