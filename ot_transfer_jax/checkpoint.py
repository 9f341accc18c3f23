"""Orbax checkpoints: atomic, resumable, and loadable without unpickling.

A run's checkpoints live in ``WORKDIR/checkpoints/<step>/`` with two items:

* ``state``: the whole :class:`~ot_transfer_jax.train.TrainState` (student
  parameters, BatchNorm statistics, optimizer state, step, RNG, OT
  potentials), as arrays (tensorstore / OCDBT);
* ``meta``: JSON: the run's config and its evaluation history (best
  validation accuracy so far, ...), so a resumed run ends exactly as an
  uninterrupted one.

Orbax writes a step into a temporary directory and renames it when complete,
so a run killed mid-write (even by SIGKILL) leaves the previous checkpoint as
the latest one; leftover temporary directories are ignored and cleaned up.
Nothing here unpickles or evaluates: arrays come from tensorstore, the rest
from JSON.

For users who only want a trained model::

  restored = ot_transfer_jax.checkpoint.restore("workdirs/digits/ot/seed0")
  logits = restored.model.apply(restored.variables, images)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be used, with what to do about it."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, *, max_to_keep: int = 3,
                 reading: bool = False) -> ocp.CheckpointManager:
  """A synchronous, atomic checkpoint manager for ``WORKDIR/checkpoints``.

  With ``reading`` (evaluation) it creates and cleans up nothing, so it can
  look at the checkpoints of a run that is still writing them.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=not reading,
      # Synchronous saves: when save() returns the step is on disk, so the
      # resume point is exactly the last step saved.
      enable_async_checkpointing=False,
      cleanup_tmp_directories=not reading,
  )
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         meta: dict) -> None:
  """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) at ``step``."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()


def _corrupt(workdir: str, step: int, err: Exception) -> CheckpointError:
  return CheckpointError(
      f"The checkpoint of step {step} in {checkpoint_dir(workdir)} cannot be "
      f"read ({type(err).__name__}: {str(err)[:300]}). If the directory was "
      "copied partially or edited, delete that step's folder to resume from "
      "the previous checkpoint, or use a fresh --workdir to start over.")


def restore_latest(manager: ocp.CheckpointManager, workdir: str,
                   target_state: Any) -> Optional[tuple[Any, dict]]:
  """The latest complete checkpoint as ``(state, meta)``; None if there is none.

  Args:
    target_state: a state with the expected structure, shapes and shardings
      (e.g. a freshly created one); the restored arrays take its placement.

  Raises:
    CheckpointError: when the checkpoint cannot be read or does not fit the
      target (another model or config wrote it).
  """
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                    target_state)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
    saved = _saved_shapes(manager, step)
  except Exception as e:  # orbax raises many types for a damaged directory.
    raise _corrupt(workdir, step, e) from None
  wanted = _shapes(abstract)
  if saved != wanted:
    raise CheckpointError(
        f"The checkpoint of step {step} in {checkpoint_dir(workdir)} does not "
        f"fit this run's model/config ({len(saved)} saved arrays vs "
        f"{len(wanted)} expected, or of other shapes). It was written by model "
        f"{meta.get('config', {}).get('model', '?')}. Use another --workdir "
        "for a different configuration, or rerun with the config that wrote "
        "it.")
  try:
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  except Exception as e:
    raise _corrupt(workdir, step, e) from None
  return state, meta


def _shapes(tree: Any) -> list:
  """The sorted shapes of a pytree's leaves: a structure-free fingerprint
  (saved trees come back as dicts, live ones as dataclasses)."""
  return sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _saved_shapes(manager: ocp.CheckpointManager, step: int) -> list:
  """The sorted leaf shapes of a saved state, from its metadata alone."""
  return _shapes(manager.item_metadata(step)["state"].tree)


@dataclasses.dataclass(frozen=True)
class Restored:
  """A trained student, ready for ``model.apply(variables, images)``."""

  model: Any
  variables: dict
  config: ml_collections.ConfigDict
  step: int
  meta: dict
  #: Per-channel input normalisation the model was trained with:
  #: ``model.apply(variables, (images - mean) / std)``, images in [0, 1].
  mean: np.ndarray
  std: np.ndarray


def restore(workdir: str, step: Optional[int] = None) -> Restored:
  """The student of a run's checkpoint, for evaluation or fine-tuning.

  Args:
    workdir: the run's ``--workdir``.
    step: a checkpointed step; the latest when None.

  Returns:
    :class:`Restored` with the model rebuilt from the saved config and its
    ``{"params", "batch_stats"}`` variables (numpy arrays).

  Raises:
    CheckpointError: no checkpoint there, or one that cannot be read.
  """
  # Local imports: keep this module light to import.
  from ot_transfer_jax import models, train

  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    raise CheckpointError(
        f"No checkpoints in {path}: train first with `python -m "
        f"experiments.main --config ... --workdir {workdir}`, or pass the "
        "workdir of a finished run.")
  manager = make_manager(workdir, reading=True)
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise CheckpointError(
        f"No complete checkpoint{'' if step is None else f' of step {step}'} "
        f"in {path} (available steps: {list(manager.all_steps())}).")
  try:
    # Host numpy arrays, read by every process whatever the topology that
    # wrote them: the target's leaf type tells orbax what to build.
    tree = manager.item_metadata(step)["state"].tree
    target = jax.tree_util.tree_map(
        lambda m: np.zeros(m.shape, m.dtype), tree)
    items = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  except Exception as e:
    raise _corrupt(workdir, step, e) from None
  meta = items["meta"]
  config = ml_collections.ConfigDict(meta["config"])
  model = models.create_model(config.model.name, meta["num_classes"],
                              **config.model.get("kwargs", {}))
  state = items["state"]
  variables = train.model_variables(state["params"], state.get("batch_stats"))
  return Restored(model=model, variables=variables, config=config, step=step,
                  meta=meta, mean=np.asarray(meta["mean"], np.float32),
                  std=np.asarray(meta["std"], np.float32))


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  """A JSON-safe dict of the config (tuples become lists)."""
  return json.loads(config.to_json())
