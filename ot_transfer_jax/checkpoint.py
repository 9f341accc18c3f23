"""Orbax checkpoints: atomic, checksummed, resumable, loadable without unpickling.

A run's checkpoints live in ``WORKDIR/checkpoints/<step>/`` with three items:

* ``state``: the whole :class:`~ot_transfer_jax.train.TrainState` (student
  parameters, BatchNorm statistics, optimizer state, step, RNG, OT
  potentials), as arrays (tensorstore / OCDBT);
* ``meta``: JSON (a :class:`RunMeta`): the run's config, number of classes,
  input normalisation and evaluation history (best validation accuracy so
  far, ...), so a resumed run ends exactly as an uninterrupted one;
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

For users who only want a trained model (the run of ``python -m
experiments.main --config experiments/configs/transfer.py:data=digits``, in
its default workdir)::

  restored = ot_transfer_jax.checkpoint.restore("workdirs/main/digits_transfer/ot")
  # images: uint8 (N, H, W, C) as the dataset stores them, or floats in
  # [0, 1], at the training resolution (restored.image_shape); predict
  # normalises them as in training. Anything else (floats in 0..255,
  # normalised floats, another size) is a ValueError saying what to do.
  class_ids = restored.predict(images)  # (N,) the dataset's ids, e.g. 5-9
  logits = restored.logits(images)      # (N, num_classes), model order

This module imports only the core (jax, flax, optax, ott-jax, orbax, numpy,
absl); ``experiments.data.test_batches(restored)`` reads a run's test split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging as std_logging
import os
import re
import sys
import traceback
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"
CORRUPT_MARK = ".corrupt-"
# How far outside [0, 1] float images may stray (interpolation overshoot)
# before they are taken for another convention (0..255, normalised).
_RANGE_SLACK = 0.1
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
          f"{step}{CORRUPT_MARK}<n>; checkpoint.restore(workdir, step=...) "
          "loads an earlier step.")


# ---------------------------------------------------------------------------
# Saving and resuming
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunMeta:
  """What a checkpoint holds besides the state: its ``meta`` item (JSON).

  Written by the training loop at every checkpoint, read back by a resume
  and by :func:`restore`.
  """

  #: The run's config as JSON (:func:`config_to_json`).
  config: dict
  #: The model's outputs (the task's classes).
  num_classes: int
  #: Per-channel input normalisation: ``(images - mean) / std``.
  mean: tuple[float, ...]
  std: tuple[float, ...]
  #: The loop's evaluation history (``experiments.loop.History`` as a dict):
  #: a resumed run ends exactly as an uninterrupted one.
  history: dict
  #: (H, W, C) of the model's inputs, which ``Restored.predict`` checks
  #: images against; None in checkpoints written before it was saved.
  image_shape: Optional[tuple[int, int, int]] = None

  @property
  def class_ids(self) -> np.ndarray:
    """int64 ``(num_classes,)``: the dataset's class id of each output
    (``config.data.classes``, e.g. 5..9 for outputs 0..4)."""
    classes = self.config.get("data", {}).get("classes")
    return np.asarray(classes if classes is not None
                      else range(self.num_classes), np.int64)

  def to_json(self) -> dict:
    return {"config": self.config, "num_classes": int(self.num_classes),
            "mean": [float(x) for x in self.mean],
            "std": [float(x) for x in self.std], "history": self.history,
            **({} if self.image_shape is None else
               {"image_shape": [int(d) for d in self.image_shape]})}

  @classmethod
  def from_json(cls, meta: dict) -> RunMeta:
    return cls(config=meta["config"], num_classes=int(meta["num_classes"]),
               mean=tuple(meta["mean"]), std=tuple(meta["std"]),
               history=meta["history"],
               image_shape=None if meta.get("image_shape") is None else tuple(
                   meta["image_shape"]))


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


def _restore_step(manager: ocp.CheckpointManager, step: int, target: Any,
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
                     run_meta.config.get("model", "?"))
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
      return _restore_step(manager, step, target_state, where, check_meta)
    except DamagedCheckpointError as e:
      moved = _set_aside(manager, step)
      logging.warning("%s Moved it to %s; resuming from the previous intact "
                      "step, if any.", e, moved)
  return None


# ---------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------


class _Attrs(dict):
  """A read-only nested dict with attribute access: the saved config when
  ml_collections (experiment stack) is not installed."""

  def __getattr__(self, name):
    try:
      value = self[name]
    except KeyError:
      raise AttributeError(name) from None
    return _Attrs(value) if isinstance(value, dict) else value


def _as_config(tree: dict):
  try:
    import ml_collections
  except ImportError:
    return _Attrs(tree)
  return ml_collections.ConfigDict(tree)


@dataclasses.dataclass(frozen=True)
class Restored:
  """A trained student with its input normalisation and label mapping.

  ``predict(images)`` and ``logits(images)`` take images as the dataset
  stores them (uint8 ``(N, H, W, C)``) or floats in [0, 1], at the model's
  resolution, and normalise them exactly as training and evaluation did;
  other shapes and value ranges (floats in 0..255, normalised floats) are a
  ``ValueError`` saying the conversion to apply.
  ``experiments.data.test_batches(restored)`` reads the run's test split.
  """

  model: Any
  variables: dict
  #: The run's config: an ``ml_collections.ConfigDict`` (a read-only
  #: attribute dict without ml_collections).
  config: Any
  step: int
  #: The checkpoint's config, normalisation and evaluation history.
  meta: RunMeta
  #: Per-channel input normalisation the model was trained with:
  #: ``model.apply(variables, (images - mean) / std)``, images in [0, 1].
  mean: np.ndarray
  std: np.ndarray
  #: The dataset's class id of each model output, int64 ``(num_classes,)``
  #: (``config.data.classes``, e.g. 5..9 for outputs 0..4).
  class_ids: np.ndarray
  #: (H, W, C) of the training inputs; None where unknown (a checkpoint
  #: written before it was saved, without ``data.image_size``): then only C
  #: is checked.
  image_shape: Optional[tuple[int, int, int]] = None

  @functools.cached_property
  def _apply(self):
    return jax.jit(functools.partial(self.model.apply, train=False))

  def normalize(self, images: np.ndarray) -> np.ndarray:
    """uint8 or [0, 1] float ``(N, H, W, C)`` -> float32 model inputs.

    Raises:
      ValueError: images of another shape than the model trained on, or
        values outside what training saw (floats far outside [0, 1], e.g.
        0..255 or already normalised; integers outside 0..255), saying which
        conversion to apply.
    """
    images = np.asarray(images)
    self._check_shape(images.shape)
    if images.dtype.kind in "iu":  # e.g. np.array of Python ints: int64.
      if images.size and (images.min() < 0 or images.max() > 255):
        raise ValueError(
            f"Integer images must hold pixel values 0..255 (as uint8 "
            f"datasets store them); got {images.dtype} values in "
            f"[{images.min()}, {images.max()}]. Rescale them to 0..255 first.")
      images = images.astype(np.uint8)
    if images.dtype == np.uint8:
      x = images.astype(np.float32) / 255
    elif images.dtype.kind == "f":
      x = images.astype(np.float32)
      self._check_float_range(x)
    else:
      raise ValueError(
          f"images have dtype {images.dtype}; pass uint8 pixels (0..255) or "
          "floats in [0, 1].")
    # The same float32 arithmetic as the data pipeline: bit-identical inputs.
    return (x - self.mean) / self.std

  def _check_shape(self, shape: tuple) -> None:
    trained = self.image_shape or (None, None, len(self.mean))
    said = "x".join("?" if d is None else str(d) for d in trained)
    if len(shape) != 4:
      fix = "pass a batch (N, H, W, C)"
      if len(shape) == 3:
        fix = ("one image? add the batch axis: images[None]"
               if shape[-1] == trained[-1] else
               "one-channel images without their channel axis? "
               "images[..., None]")
      raise ValueError(
          f"images must be (N, H, W, C), here N x {said}; got shape "
          f"{tuple(shape)}: {fix}.")
    if any(t is not None and t != d for t, d in zip(trained, shape[1:])):
      got = "x".join(str(d) for d in shape[1:])
      raise ValueError(
          f"This model was trained on {said} images (H x W x C); got {got} "
          f"(shape {tuple(shape)}). Resize or crop them to {said} as the "
          "dataset's images were (e.g. test_batches() yields them so).")

  @staticmethod
  def _check_float_range(x: np.ndarray) -> None:
    """Training saw [0, 1] (uint8 / 255); far outside it is another
    convention, silently wrong predictions if accepted."""
    if not x.size:
      return
    if not np.isfinite(x).all():
      raise ValueError(f"images hold {int((~np.isfinite(x)).sum())} NaN or "
                       "inf values; pass finite pixels.")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_SLACK:
      raise ValueError(
          f"Float images must be in [0, 1] as in training (uint8 / 255); "
          f"these go down to {lo:.4g}: already normalised ((x - mean) / "
          "std)? Pass the raw [0, 1] or uint8 images: predict and logits "
          "normalise them with the run's mean and std themselves.")
    if hi > 1 + _RANGE_SLACK:
      guess = " (0..255 pixels?)" if 2 < hi <= 255 else ""
      raise ValueError(
          f"Float images must be in [0, 1] as in training (uint8 / 255); "
          f"these reach {hi:.4g}{guess}. Divide them by 255 (images / 255), "
          "or pass the uint8 array itself.")

  def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """float32 ``(N, num_classes)`` logits, outputs in the model's order
    (``class_ids[k]`` is output k's dataset class)."""
    x = self.normalize(images)
    out = []
    for start in range(0, len(x), batch_size):
      chunk = x[start:start + batch_size]
      pad = batch_size - len(chunk)  # One shape: one compilation.
      padded = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]),
                                               chunk.dtype)]) if pad else chunk
      logits = self._apply(self.variables, jnp.asarray(padded))
      out.append(np.asarray(logits, np.float32)[:len(chunk)])
    if not out:
      return np.zeros((0, len(self.class_ids)), np.float32)
    return np.concatenate(out)

  def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """int64 ``(N,)``: the dataset's class id of each image's prediction."""
    return self.class_ids[np.argmax(self.logits(images, batch_size), -1)]


def restore(workdir: str, step: Optional[int] = None) -> Restored:
  """The student of a run's checkpoint, for evaluation or fine-tuning.

  Reads only (safe while the run is still writing); verifies the checksums.

  Args:
    workdir: the run's ``--workdir``.
    step: a checkpointed step; the latest when None.

  Returns:
    :class:`Restored` with the model rebuilt from the saved config, its
    ``{"params", "batch_stats"}`` variables (numpy arrays), the input
    normalisation and the label mapping.

  Raises:
    CheckpointError: no checkpoint there, or one that cannot be read or does
      not match its checksums (the message names the array and the step).
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
  if not manager.all_steps():
    raise CheckpointError(
        f"No complete checkpoint in {path} yet: the run in {workdir} stopped "
        "(or is still running) before its first checkpoint. Rerun its "
        f"training command (`python -m experiments.main --config ... "
        f"--workdir {workdir}`, the same flags) to resume it; it starts from "
        "step 0.")
  step = manager.latest_step() if step is None else step
  if step not in manager.all_steps():
    raise CheckpointError(
        f"No complete checkpoint of step {step} in {path} (available steps: "
        f"{list(manager.all_steps())}).")
  state, meta = _restore_step(manager, step, None, path)
  config = _as_config(meta.config)
  model = models.create_model(config.model.name, meta.num_classes,
                              **config.model.get("kwargs", {}))
  variables = train.model_variables(state["params"], state.get("batch_stats"))
  mean = np.asarray(meta.mean, np.float32)
  image_shape = meta.image_shape
  size = meta.config.get("data", {}).get("image_size")
  if image_shape is None and size:  # Older checkpoints: from the config.
    image_shape = (size, size, len(mean))
  return Restored(model=model, variables=variables, config=config, step=step,
                  meta=meta, mean=mean, std=np.asarray(meta.std, np.float32),
                  class_ids=meta.class_ids,
                  image_shape=None if image_shape is None else tuple(
                      int(d) for d in image_shape))


def config_to_json(config) -> dict:
  """A JSON-safe dict of an ``ml_collections.ConfigDict`` (tuples -> lists)."""
  return json.loads(config.to_json())
