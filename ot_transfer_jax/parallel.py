"""Data parallelism: the device mesh, sharded batches, replicated state, evaluation.

One 1-D mesh with axis ``"data"``: a step is written for the *global* batch and
compiled once with ``jax.jit`` (:func:`ot_transfer_jax.train.make_train_step`);
the batch is sharded along ``"data"``, the state and the teacher are
replicated, and XLA inserts the collectives. So BatchNorm statistics and every
layer's OT problem are computed over the global batch, and results do not
depend on the number of devices (or hosts)::

  mesh = parallel.make_mesh(batch_size=B)     # the devices B divides over
  state = parallel.replicate(state, mesh)
  state, metrics = train_step(state, teacher_vars,
                              parallel.shard_batch(host_batch, mesh))
  parallel.evaluate(parallel.make_eval_step(model, mesh), variables,
                    host_batches, mesh)     # {"accuracy", "loss", "count"}
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any


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


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (state, teacher)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over the ``"data"`` axis."""
  return NamedSharding(mesh, PartitionSpec("data"))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's rows of the global batch -> a global sharded array.

  Each process passes its own ``B / process_count`` rows; on one process this
  is the whole batch. The leading dimension must divide by the device count
  (``make_mesh(batch_size=B)`` picks a mesh it divides over).
  """
  sharding = batch_sharded(mesh)
  n = mesh.devices.size
  out = {}
  for k, v in batch.items():
    global_rows = v.shape[0] * jax.process_count()
    if global_rows % n:
      raise ValueError(
          f"The global batch size {global_rows} must be divisible by the "
          f"{n} devices of the mesh; choose a batch size that is a multiple of "
          f"{n}, or build the mesh with parallel.make_mesh(batch_size=...).")
    out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
  return out


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a pytree on every device of the mesh (the state, the teacher)."""
  return jax.device_put(tree, replicated(mesh))


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

  return jax.jit(eval_step, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                 out_shardings=replicated(mesh))


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
