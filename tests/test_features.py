"""Representation capture by layer path: shapes, state, errors, jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ot_transfer_jax.features import (
    apply_with_features,
    available_layers,
    validate_layers,
)
from ot_transfer_jax.models import CifarResNet, create_model

from model_support import random_variables

# A resnet14: the CIFAR ResNet with two blocks per stage, so "stage3/block1"
# exists, at half resnet20's compile time.
_MODEL = CifarResNet(10, depth=14)
_X = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))


@functools.cache
def _variables():
  return random_variables(_MODEL, _X.shape)


def test_available_layers_lists_stages_blocks_and_head():
  layers = available_layers(_MODEL, _variables(), _X)
  expected = {"conv1", "bn1", "stage1", "stage3", "stage3/block1",
              "stage3/block1/conv2", "head"}
  assert expected <= set(layers)
  assert "" not in layers and layers == sorted(layers)


def test_available_layers_of_an_abstract_resnet101():
  model = create_model("resnet101", 1000)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  layers = set(available_layers(model, variables, x))
  assert {"stage3/block22", "stage4", "stage1/block0/downsample_bn"} <= layers
  assert "stage3/block1/downsample_bn" not in layers


def test_captures_requested_layers_with_their_shapes():
  layers = ("stage2", "stage3", "stage3/block1", "head")
  logits, features, state = apply_with_features(
      _MODEL, _variables(), _X, layers, train=False)
  assert logits.shape == (8, 10)
  assert set(features) == set(layers)
  assert features["stage2"].shape == (8, 16, 16, 32)
  assert features["stage3"].shape == (8, 8, 8, 64)
  assert features["stage3/block1"].shape == (8, 8, 8, 64)
  # A stage's output is its last block's; "head"'s is the logits.
  np.testing.assert_array_equal(features["stage3"], features["stage3/block1"])
  np.testing.assert_array_equal(features["head"], logits)
  np.testing.assert_allclose(
      logits, _MODEL.apply(_variables(), _X), rtol=1e-6, atol=1e-6)
  assert state == {}


@pytest.mark.parametrize(
    "name,width,shapes",
    [
        ("digits_cnn", 1.0, {"stage1": (8, 8, 8, 16), "stage2": (8, 4, 4, 32),
                             "stage3": (8, 64)}),
        ("digits_cnn", 0.5, {"stage1": (8, 8, 8, 8), "stage2": (8, 4, 4, 16),
                             "stage3": (8, 32)}),
        ("digits_mlp", 1.0, {"stage1": (8, 128), "stage2": (8, 64)}),
    ],
)
def test_digits_stage_shapes(name, width, shapes):
  model = create_model(name, 10, width=width)
  x = jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  forward = functools.partial(
      apply_with_features, model, layers=tuple(shapes), train=True)
  logits, features, _ = jax.eval_shape(forward, variables, x)
  assert logits.shape == (8, 10)
  assert {k: v.shape for k, v in features.items()} == shapes


def test_training_returns_updated_batch_stats_under_jit():
  layers = ("stage1", "stage3/block0")

  @functools.partial(jax.jit, static_argnames=("layers", "train"))
  def forward(variables, x, layers, train):
    return apply_with_features(_MODEL, variables, x, layers, train=train)

  variables = _variables()
  logits, features, state = forward(variables, _X, layers, True)
  eager = apply_with_features(_MODEL, variables, _X, layers, train=True)
  assert_close = functools.partial(
      np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
  jax.tree.map(assert_close, (logits, features, state), eager)

  assert set(state) == {"batch_stats"}
  old, new = variables["batch_stats"], state["batch_stats"]
  assert jax.tree.structure(new) == jax.tree.structure(old)
  path = ("stage1", "block0", "bn1", "mean")
  assert not np.allclose(
      functools.reduce(dict.get, path, old),
      functools.reduce(dict.get, path, new))


def test_model_without_batch_norm_has_empty_state():
  model = create_model("digits_mlp", 10)
  x = jnp.ones((8, 8, 8, 1))
  variables = random_variables(model, x.shape)
  logits, features, state = apply_with_features(
      model, variables, x, ("stage2",), train=True)
  assert features["stage2"].shape == (8, 64)
  assert logits.shape == (8, 10) and state == {}


def test_unknown_layer_names_path_nearest_match_and_available_layers():
  with pytest.raises(ValueError) as info:
    validate_layers(_MODEL, _variables(), _X, ["stage3", "stage3/blok1"])
  message = str(info.value)
  unknown, available = message.split("Available layers: ")
  assert unknown == (
      "unknown layer 'stage3/blok1' (did you mean 'stage3/block1'?). ")
  assert available.split(", ") == available_layers(_MODEL, _variables(), _X)

  validate_layers(_MODEL, _variables(), _X, ["stage3", "stage3/block1"])


def test_apply_with_features_raises_the_same_error_under_jit():
  @jax.jit
  def forward(variables, x):
    return apply_with_features(_MODEL, variables, x, ("stage4",), train=False)

  with pytest.raises(
      ValueError,
      match=r"^unknown layer 'stage4' \(did you mean 'stage\d'\?\)\. "
      r"Available layers: bn1, conv1, head, stage1, ",
  ):
    forward(_variables(), _X)
