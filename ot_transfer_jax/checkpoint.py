"""Orbax checkpoints: atomic, checksummed, resumable, loadable without unpickling.

A run's checkpoints live in ``WORKDIR/checkpoints/<step>/`` with three items:

* ``state``: the whole :class:`~ot_transfer_jax.train.TrainState` (student
  parameters, BatchNorm statistics, optimizer state, step, RNG, OT
  potentials), as arrays (tensorstore / OCDBT);
* ``meta``: JSON (a :class:`RunMeta`): the model's name and keyword
  arguments, the class id of each output, the input shape and normalisation,
  the evaluation history (best validation accuracy so far, ...: a resumed run
  ends exactly as an uninterrupted one) and the run's config (opaque here);
* ``checksums``: JSON ``{key path: sha256 of the array's bytes}`` for every
  array of ``state`` (key paths like ``params.stage2.conv.kernel`` or
  ``opt_state.1.0.trace.model.head.bias``), plus ``meta``'s, computed at save
  and verified at every restore: a flipped bit is an error naming the array
  and the step, not a silently different model.

Orbax writes a step into a temporary directory and renames it when complete,
so a run killed mid-write (even by SIGKILL) leaves the previous checkpoint as
the latest one; leftover temporary directories are ignored and cleaned up.
Resuming (:func:`restore_latest`) takes the newest *intact* step: a damaged
one is renamed ``<step>.corrupt-<n>`` (kept for inspection, never deleted;
orbax ignores the name) and the previous step is tried, with one warning line
per damaged step (the TensorStore reason, not orbax's spec dumps; the
tracebacks its event loop prints after a failed read are dropped).
Nothing here unpickles or evaluates: arrays come from tensorstore, the rest
from JSON.

Loading a trained student for evaluation or predictions is
:mod:`ot_transfer_jax.inference` (``restore``), built on this module.

This module imports only the core (jax, flax, optax, orbax, numpy, absl).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging as std_logging
import os
import re
import sys
import traceback
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"
CORRUPT_MARK = ".corrupt-"
_META_KEY = "<meta>"  # The checksum of the meta item (not an array path).


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be used, with what to do about it."""


class DamagedCheckpointError(CheckpointError):
  """A step whose files cannot be read or do not match their checksums."""


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
  manager = ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler(),
                     "checksums": ocp.JsonCheckpointHandler()})
  # orbax removes leftover temporary steps in a background thread; wait for
  # it, so that an error raised right after (a bad config) exits cleanly
  # instead of that thread failing with a traceback at interpreter shutdown.
  wait_for_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory",
                             None)
  if wait_for_cleanup is not None:
    wait_for_cleanup()
  return manager


# ---------------------------------------------------------------------------
# Key paths and checksums
# ---------------------------------------------------------------------------


def _key_name(key) -> str:
  """One key of a pytree path, the same for a live and a restored tree
  (a dataclass field and the dict key orbax saves it under)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def key_path(path) -> str:
  """``params.stage2.conv.kernel``: a pytree key path as orbax names it."""
  return ".".join(_key_name(k) for k in path)


def flat_arrays(tree: Any) -> dict[str, Any]:
  """``{key path: leaf}`` of a pytree (empty containers and None dropped)."""
  return {key_path(p): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _host(x) -> np.ndarray:
  """A leaf's bytes on the host; a replicated global array reads its local
  copy, so every process can checksum without a collective."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.ascontiguousarray(np.asarray(x))


def _digest(x) -> str:
  x = _host(x)
  h = hashlib.sha256()
  h.update(f"{x.dtype.str}{x.shape}".encode())
  h.update(x.tobytes())
  return h.hexdigest()


def _canonical_json(obj: Any) -> Any:
  """What ``obj`` reads back as after a JSON round trip (tuples -> lists)."""
  return json.loads(json.dumps(obj))


def checksums(state: Any, meta: dict) -> dict[str, str]:
  """``{key path: sha256}`` of every array of ``state``, and of ``meta``."""
  out = {path: _digest(leaf) for path, leaf in flat_arrays(state).items()}
  out[_META_KEY] = hashlib.sha256(json.dumps(
      _canonical_json(meta), sort_keys=True).encode()).hexdigest()
  return out


def verify(state: Any, meta: dict, expected: dict[str, str], step: int,
           where: str) -> None:
  """Raises :class:`DamagedCheckpointError` naming the first array (in key
  path order) whose bytes differ from the checksum saved with it."""
  actual = checksums(state, meta)
  for path in sorted(expected.keys() | actual.keys()):
    if expected.get(path) != actual.get(path):
      what = "the meta item (config and history)" if path == _META_KEY else (
          f"array {path}")
      raise DamagedCheckpointError(
          f"The checkpoint of step {step} in {where} is damaged: {what} does "
          "not match the checksum saved with it (bit rot or a partial "
          "copy). Rerunning the training command resumes from the newest "
          "intact step, moving this one aside to "
          f"{step}{CORRUPT_MARK}<n>; inference.restore(workdir, step=...) "
          "loads an earlier step.")


# ---------------------------------------------------------------------------
# Saving and resuming
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunMeta:
  """What a checkpoint holds besides the state: its ``meta`` item (JSON).

  Written by the training loop (``experiments/loop.py``) at every
  checkpoint, read back by a resume and by
  :func:`ot_transfer_jax.inference.restore`, which rebuilds the model from
  the explicit fields alone: the library never reads ``config``.
  """

  #: The run's config as JSON (:func:`config_to_json`): opaque here; the
  #: experiment driver compares it on resume.
  config: dict
  #: The model's outputs (the task's classes).
  num_classes: int
  #: Per-channel input normalisation: ``(images - mean) / std``.
  mean: tuple[float, ...]
  std: tuple[float, ...]
  #: The loop's evaluation history (``experiments.loop.History`` as a dict):
  #: a resumed run ends exactly as an uninterrupted one.
  history: dict
  #: The student's :func:`ot_transfer_jax.models.create_model` name (None
  #: only for a checkpoint that never recorded one).
  model: Optional[str]
  #: Its keyword arguments (``width``, ...).
  model_kwargs: dict
  #: The dataset's class id of each model output, ``(num_classes,)`` (e.g.
  #: 5..9 for outputs 0..4).
  class_ids: tuple[int, ...]
  #: (H, W, C) of the model's inputs, which ``Restored.predict`` checks
  #: images against; None where unknown.
  image_shape: Optional[tuple[int, int, int]] = None

  def to_json(self) -> dict:
    return {"config": self.config, "num_classes": int(self.num_classes),
            "mean": [float(x) for x in self.mean],
            "std": [float(x) for x in self.std], "history": self.history,
            "model": self.model, "model_kwargs": dict(self.model_kwargs),
            "class_ids": [int(c) for c in self.class_ids],
            **({} if self.image_shape is None else
               {"image_shape": [int(d) for d in self.image_shape]})}

  @classmethod
  def from_json(cls, meta: dict) -> RunMeta:
    """Also reads the meta items of older checkpoints
    (:func:`_fields_of_old_checkpoints`)."""
    meta = {**_fields_of_old_checkpoints(meta), **meta}
    return cls(config=meta["config"], num_classes=int(meta["num_classes"]),
               mean=tuple(meta["mean"]), std=tuple(meta["std"]),
               history=meta["history"], model=meta["model"],
               model_kwargs=dict(meta["model_kwargs"]),
               class_ids=tuple(int(c) for c in meta["class_ids"]),
               image_shape=None if meta.get("image_shape") is None else tuple(
                   meta["image_shape"]))


# ---------------------------------------------------------------------------
# COMPATIBILITY: checkpoints written before RunMeta had explicit fields
# ---------------------------------------------------------------------------


def _fields_of_old_checkpoints(meta: dict) -> dict:
  """COMPATIBILITY ONLY, the one place the library reads a config's layout.

  A meta item written before ``model``, ``model_kwargs`` and ``class_ids``
  were saved (and, older still, ``image_shape``) holds only the run's
  config: they are read from its ``model.name``, ``model.kwargs``,
  ``data.classes`` and ``data.image_size`` (the layout of ``experiments/``'
  configs when those checkpoints were written). ``from_json`` lets the
  item's own fields win, so a current checkpoint never depends on this.

  Returns:
    ``{"model", "model_kwargs", "class_ids"[, "image_shape"]}``.
  """
  config = meta.get("config") or {}
  model, data = config.get("model") or {}, config.get("data") or {}
  classes = data.get("classes")
  fields = {"model": model.get("name"),
            "model_kwargs": model.get("kwargs") or {},
            "class_ids": list(classes if classes is not None
                              else range(int(meta["num_classes"])))}
  size = data.get("image_size")
  if size:  # Square inputs of the dataset's channels.
    fields["image_shape"] = [size, size, len(meta["mean"])]
  return fields


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         run_meta: RunMeta) -> None:
  """Saves ``state`` (a pytree of arrays), ``run_meta`` (JSON) and their
  checksums at ``step``."""
  meta = run_meta.to_json()
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
      checksums=ocp.args.JsonSave(checksums(state, meta))))
  manager.wait_until_finished()


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _has_checksums(manager: ocp.CheckpointManager, step: int) -> bool:
  return os.path.isdir(os.path.join(_step_dir(manager, step), "checksums"))


# A TensorStore status line: 'OUT_OF_RANGE: Error reading "params.x/0.0" ...'.
_STATUS_LINE = re.compile(r"\b[A-Z][A-Z_]{3,}: .+")


def _reason(err: BaseException) -> str:
  """One line saying why orbax could not read a step: the first TensorStore
  status line of the error or its causes (orbax wraps it in multi-line
  messages with spec dumps), else the error's first line."""
  chain, seen = [], set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    chain.append(err)
    err = err.__cause__ or err.__context__
  for e in chain:
    match = _STATUS_LINE.search(str(e))
    if match:
      return match.group(0)[:240]
  first = next((l.strip() for l in str(chain[0]).splitlines() if l.strip()),
               "")
  return f"{type(chain[0]).__name__}: {first}"[:240]


class _OrbaxAftermath:
  """Drops what orbax's asyncio machinery prints after a failed read.

  When TensorStore fails a read, orbax's event loop is torn down while
  callbacks and tasks of that read are still pending; they later report
  ``RuntimeError: Event loop is closed`` (through ``sys.unraisablehook``)
  and "Task exception was never retrieved" (the ``asyncio`` logger), each
  with a traceback, long after the step was reported as damaged. Installed
  at the first restore, for the rest of the process (the reports come late);
  everything else still goes to the previous hook and handlers.
  """

  installed = False

  @classmethod
  def install(cls) -> None:
    if cls.installed:
      return
    cls.installed = True
    previous = sys.unraisablehook

    def unraisable(info):
      if not (isinstance(info.exc_value, RuntimeError) and
              str(info.exc_value) == "Event loop is closed"):
        previous(info)

    sys.unraisablehook = unraisable
    std_logging.getLogger("asyncio").addFilter(cls._asyncio_filter)

  @staticmethod
  def _asyncio_filter(record) -> bool:
    """False (drop) for a never-retrieved failure of an orbax/TensorStore
    read; other asyncio messages pass."""
    if "exception was never retrieved" not in str(record.msg):
      return True
    text = "".join(traceback.format_exception(*record.exc_info)) if (
        record.exc_info) else record.getMessage()
    return not any(name in text for name in ("orbax", "tensorstore"))


def _unreadable(where: str, step: int, err: Exception) -> DamagedCheckpointError:
  return DamagedCheckpointError(
      f"The checkpoint of step {step} in {where} cannot be read "
      f"({_reason(err)}). Rerunning the training command resumes from the "
      "newest intact step and moves this one aside to "
      f"{step}{CORRUPT_MARK}<n>; or use a fresh --workdir to start over.")


def check_compatible(saved: Any, wanted: Any, step: int, where: str,
                     model: str = "?") -> None:
  """Raises :class:`CheckpointError` naming the first key path whose
  presence, shape or dtype differs between a saved and a wanted tree.

  Args:
    saved, wanted: pytrees of leaves with ``.shape`` and ``.dtype`` (orbax
      array metadata, ``jax.ShapeDtypeStruct`` or arrays).
  """
  saved, wanted = flat_arrays(saved), flat_arrays(wanted)
  for path in sorted(saved.keys() | wanted.keys()):
    s, w = saved.get(path), wanted.get(path)
    if s is None or w is None:
      diff = (f"{path} is saved but this run has no such array" if w is None
              else f"this run has {path} but the checkpoint does not")
    elif tuple(s.shape) != tuple(w.shape) or np.dtype(s.dtype) != np.dtype(
        w.dtype):
      diff = (f"{path} is {np.dtype(s.dtype).name}{tuple(s.shape)} in the "
              f"checkpoint and {np.dtype(w.dtype).name}{tuple(w.shape)} in "
              "this run")
    else:
      continue
    raise CheckpointError(
        f"The checkpoint of step {step} in {where} does not fit this run's "
        f"model/config: {diff} ({len(saved)} saved arrays, {len(wanted)} "
        f"expected). It was written by model {model}. Use another --workdir "
        "for a different configuration, or rerun with the config that wrote "
        "it.")


def restore_step(manager: ocp.CheckpointManager, step: int, target: Any,
                  where: str,
                  check_meta: Optional[Callable[[int, RunMeta], None]] = None
                  ) -> tuple[Any, RunMeta]:
  """``(state, meta)`` of one step, checked for fit, then for integrity.

  Args:
    target: a pytree of arrays or ``jax.ShapeDtypeStruct``s (with
      shardings) giving the wanted structure; ``None``: the saved structure,
      as host numpy arrays.

  Raises:
    DamagedCheckpointError: unreadable files or a checksum mismatch.
    CheckpointError: a readable checkpoint of another model (no fit).
  """
  _OrbaxAftermath.install()  # Before a read fails: its noise comes late.
  try:
    meta = manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
    saved_tree = manager.item_metadata(step)["state"].tree
    run_meta = RunMeta.from_json(meta)
  except Exception as e:  # orbax raises many types for a damaged directory.
    raise _unreadable(where, step, e) from None
  if check_meta is not None:
    check_meta(step, run_meta)
  if target is None:
    # Host numpy arrays, read by every process whatever the topology that
    # wrote them: the target's leaf type tells orbax what to build.
    target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype),
                                    saved_tree)
  else:
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    check_compatible(saved_tree, target, step, where,
                     run_meta.model or "?")
  has_sums = _has_checksums(manager, step)
  try:
    items = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        **({"checksums": ocp.args.JsonRestore()} if has_sums else {})))
  except Exception as e:
    raise _unreadable(where, step, e) from None
  if has_sums:
    verify(items["state"], meta, items["checksums"], step, where)
  else:
    logging.warning("The checkpoint of step %d in %s has no checksums "
                    "(written by an older version): not verified.", step,
                    where)
  return items["state"], run_meta


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Renames a damaged step to ``<step>.corrupt-<n>`` (a name orbax does not
  read as a step), on process 0; all processes then see the same steps."""
  src = _step_dir(manager, step)
  n = 1
  while os.path.exists(f"{src}{CORRUPT_MARK}{n}"):
    n += 1
  dst = f"{src}{CORRUPT_MARK}{n}"
  if jax.process_index() == 0:
    os.rename(src, dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}_{n}")
  manager.reload()
  return dst


def restore_latest(manager: ocp.CheckpointManager, workdir: str,
                   target_state: Any,
                   check_meta: Optional[Callable[[int, RunMeta], None]] = None
                   ) -> Optional[tuple[Any, RunMeta]]:
  """The newest intact checkpoint as ``(state, meta)``; None if there is none.

  For resuming. Steps are tried newest first; a damaged one (unreadable, or
  an array that does not match its checksum) is logged, renamed
  ``<step>.corrupt-<n>`` (kept, never deleted) and the previous step is
  tried. When every step is damaged, None: the run starts over.

  Args:
    target_state: a state with the expected structure, shapes and shardings
      (e.g. a freshly created one); the restored arrays take its placement.
    check_meta: ``(step, meta) -> None``, called with a step's meta before
      its arrays are read; what it raises propagates (e.g. a resume with
      other settings, refused).

  Raises:
    CheckpointError: the newest readable checkpoint does not fit the target
      (another model or config wrote it): nothing is renamed.
  """
  where = checkpoint_dir(workdir)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore_step(manager, step, target_state, where, check_meta)
    except DamagedCheckpointError as e:
      moved = _set_aside(manager, step)
      logging.warning("%s Moved it to %s; resuming from the previous intact "
                      "step, if any.", e, moved)
  return None


def config_to_json(config) -> dict:
  """A JSON-safe dict of an ``ml_collections.ConfigDict`` (tuples -> lists)."""
  return json.loads(config.to_json())
