"""A trained student, ready to predict: :func:`restore` -> :class:`Restored`.

For users who only want a trained model (the run of ``python -m
experiments.main --config experiments/configs/transfer.py:data=digits``, in
its default workdir)::

  from ot_transfer_jax import inference
  restored = inference.restore("workdirs/main/digits_transfer/ot")
  # images: uint8 (N, H, W, C) as the dataset stores them, or floats in
  # [0, 1], at the training resolution (restored.image_shape); predict
  # normalises them as in training. Anything else (floats in 0..255,
  # normalised floats, another size) is a ValueError saying what to do.
  class_ids = restored.predict(images)  # (N,) the dataset's ids, e.g. 5-9
  logits = restored.logits(images)      # (N, num_classes), model order

The model is rebuilt from the checkpoint's explicit fields
(:class:`~ot_transfer_jax.checkpoint.RunMeta`: model name and keyword
arguments, class ids, input shape and normalisation), never from the run's
config, which ``Restored.config`` only passes on.
This module imports only the core (jax, flax, optax, ott-jax, orbax, numpy,
absl); ``experiments.data.test_batches(restored)`` reads a run's test split.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ot_transfer_jax import checkpoint
from ot_transfer_jax.checkpoint import CheckpointError, RunMeta

# How far outside [0, 1] float images may stray (interpolation overshoot)
# before they are taken for another convention (0..255, normalised).
_RANGE_SLACK = 0.1


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
  #: The checkpoint's meta item: model, classes, normalisation, history.
  meta: RunMeta
  #: Per-channel input normalisation the model was trained with:
  #: ``model.apply(variables, (images - mean) / std)``, images in [0, 1].
  mean: np.ndarray
  std: np.ndarray
  #: The dataset's class id of each model output, int64 ``(num_classes,)``
  #: (e.g. 5..9 for outputs 0..4).
  class_ids: np.ndarray
  #: (H, W, C) of the training inputs; None where unknown (an old
  #: checkpoint that recorded no input size): then only C is checked.
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
    :class:`Restored` with the model rebuilt from the saved model name and
    keyword arguments, its ``{"params", "batch_stats"}`` variables (numpy
    arrays), the input normalisation and the label mapping.

  Raises:
    CheckpointError: no checkpoint there, or one that cannot be read or does
      not match its checksums (the message names the array and the step).
  """
  # Local imports: keep this module light to import.
  from ot_transfer_jax import models, train

  path = checkpoint.checkpoint_dir(workdir)
  if not os.path.isdir(path):
    raise CheckpointError(
        f"No checkpoints in {path}: train first with `python -m "
        f"experiments.main --config ... --workdir {workdir}`, or pass the "
        "workdir of a finished run.")
  manager = checkpoint.make_manager(workdir, reading=True)
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
  state, meta = checkpoint.restore_step(manager, step, None, path)
  if meta.model is None:
    raise CheckpointError(
        f"The checkpoint of step {step} in {path} records no model name, so "
        "the model cannot be rebuilt: restore its arrays with "
        "checkpoint.restore_step and build the model yourself.")
  model = models.create_model(meta.model, meta.num_classes,
                              **meta.model_kwargs)
  variables = train.model_variables(state["params"], state.get("batch_stats"))
  return Restored(model=model, variables=variables,
                  config=_as_config(meta.config), step=step, meta=meta,
                  mean=np.asarray(meta.mean, np.float32),
                  std=np.asarray(meta.std, np.float32),
                  class_ids=np.asarray(meta.class_ids, np.int64),
                  image_shape=None if meta.image_shape is None else tuple(
                      int(d) for d in meta.image_shape))
