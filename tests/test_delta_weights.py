"""Tests of ot_transfer_jax.delta_weights: DELTA's behaviour-based channel weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ot_transfer_jax import delta_weights, losses
from ot_transfer_jax.features import apply_with_features
from ot_transfer_jax.models import create_model

from model_support import random_variables


def test_weights_are_a_softmax_of_standardised_increases():
  # d = (1, 1, 4): mean 2, population std sqrt(2), z = (-1, -1, 2) / sqrt(2).
  weights = delta_weights.delta_channel_weights(jnp.array([1.0, 1.0, 4.0]), temperature=5.0)
  z = np.array([-1.0, -1.0, 2.0]) / np.sqrt(2.0)
  expected = np.exp(z / 5) / np.exp(z / 5).sum()
  np.testing.assert_allclose(weights, expected, rtol=1e-6)
  assert weights[2] > weights[0] == weights[1]
  # Shifting or scaling every increase changes nothing (standardised).
  np.testing.assert_allclose(
      delta_weights.delta_channel_weights(jnp.array([3.0, 3.0, 9.0])), weights, rtol=1e-6)


def test_equal_increases_give_uniform_weights_and_delta_equals_omega_i(layer_pair):
  weights = delta_weights.delta_channel_weights(jnp.zeros(4))
  np.testing.assert_allclose(weights, np.full(4, 0.25))
  s, t = layer_pair(6, 4, 4, positions=(3, 3))
  np.testing.assert_allclose(losses.delta(s, t, weights), losses.feature_matching(s, t),
                             rtol=1e-6)


def test_bad_inputs_say_what_is_expected():
  with pytest.raises(ValueError, match=r"\(n,\) vector"):
    delta_weights.delta_channel_weights(jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    delta_weights.delta_channel_weights(jnp.zeros(3), temperature=0.0)


class _Pass(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return x


class _Toy(nn.Module):
  """logits = head(stage1(x)), stage1 the identity: removals are hand-computable."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(2, name="head")(_Pass(name="stage1")(x, train))


def test_removal_increase_on_a_hand_checkable_network():
  model = _Toy()
  # Channel 0 carries the class, channel 1 is ignored by the head.
  params = {"head": {"kernel": jnp.array([[2.0, -2.0], [0.0, 0.0]]), "bias": jnp.zeros(2)}}
  x = jnp.array([[1.0, 0.5], [-1.0, 3.0]])
  labels = jnp.array([0, 1])
  increase = delta_weights.channel_removal_increase(model, {"params": params}, x, labels, "stage1")
  # Logits (2, -2) and (-2, 2) are right: CE = log(1 + e^-4); with channel 0
  # gone the logits are 0: CE = log 2. Without channel 1 nothing changes.
  np.testing.assert_allclose(increase, [np.log(2) - np.log1p(np.exp(-4.0)), 0.0],
                             rtol=1e-5, atol=1e-6)


def test_masking_a_last_stage_channel_removes_its_head_contribution():
  model = create_model("small_cnn", 3, width=0.25)
  variables = random_variables(model, (4, 12, 12, 1))
  x = jax.random.normal(jax.random.key(0), (4, 12, 12, 1))
  logits, feats, _ = apply_with_features(model, variables, x, ("stage3",), train=False)
  ones = jnp.ones(feats["stage3"].shape[-1])
  np.testing.assert_allclose(
      delta_weights.apply_with_channel_mask(model, variables, x, "stage3", ones), logits, rtol=1e-6)
  j = 2
  masked = delta_weights.apply_with_channel_mask(model, variables, x, "stage3", ones.at[j].set(0.0))
  pooled = feats["stage3"].mean(axis=(1, 2))  # Global average pooling, then head.
  kernel = variables["params"]["head"]["kernel"]
  np.testing.assert_allclose(masked, logits - pooled[:, j:j + 1] * kernel[j], rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(delta_weights.head_inputs(model, variables, x), pooled, rtol=1e-5)


def test_fitted_head_separates_separable_features():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 10)
  features = np.eye(3)[labels] * 3 + 0.3 * rng.normal(size=(30, 3))
  head = delta_weights.fit_linear_head(jnp.asarray(features), jnp.asarray(labels), 3)
  predictions = np.argmax(features @ head["kernel"] + head["bias"], axis=-1)
  np.testing.assert_array_equal(predictions, labels)


def test_channel_weights_per_layer_sum_to_one_and_favour_useful_channels():
  model = _Toy()
  params = {"head": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(2), 20)
  # Channel 1 encodes the label, channels 0 and 2 are noise.
  x = rng.normal(size=(40, 3))
  x[:, 1] = np.where(labels == 0, -2.0, 2.0) + 0.1 * rng.normal(size=40)
  weights = delta_weights.channel_weights(model, {"params": params}, jnp.asarray(x, jnp.float32),
                                  jnp.asarray(labels), ("stage1",), num_classes=2)
  w = np.asarray(weights["stage1"])
  assert w.shape == (3,) and np.isclose(w.sum(), 1.0)
  assert w[1] > max(w[0], w[2])


@pytest.mark.slow  # 4-9 s of compilation: full suite only.
def test_delta_regularizer_computes_its_weights_from_the_teacher_in_init():
  from ot_transfer_jax import regularizers
  teacher = create_model("small_cnn", 4, width=0.25)  # Another label space (4).
  teacher_vars = random_variables(teacher, (4, 12, 12, 1))
  images = jax.random.normal(jax.random.key(2), (12, 12, 12, 1))
  labels = jnp.arange(12) % 3  # The target task: 3 classes.
  context = regularizers.Context(student_layer="stage2", teacher_layer="stage2",
                                 teacher=teacher, teacher_vars=teacher_vars,
                                 images=images, labels=labels)
  reg = regularizers.get("delta")()
  layer = jax.ShapeDtypeStruct((6, 6, 6, 8), jnp.float32)
  params, state = reg.init(jax.random.key(0), layer, layer, context)
  model = teacher.clone(num_classes=3)
  expected = delta_weights.channel_weights(model, teacher_vars, images, labels, ("stage2",), 3)
  np.testing.assert_allclose(state["channel_weights"], expected["stage2"], rtol=1e-4)
  assert params == {} and np.isclose(float(state["channel_weights"].sum()), 1.0)
  s, t = (jax.random.normal(jax.random.key(k), (6, 6, 6, 8)) for k in (3, 4))
  value, _, new_state = reg.apply(params, state, s, t)
  np.testing.assert_allclose(value, losses.delta(s, t, state["channel_weights"]), rtol=1e-6)
  assert new_state is state

  with pytest.raises(ValueError, match="8 channels, the student's 5"):
    reg.init(jax.random.key(0), jax.ShapeDtypeStruct((6, 6, 6, 5), jnp.float32), layer,
             context)
  with pytest.raises(ValueError, match="training images.*feature_matching"):
    reg.init(jax.random.key(0), layer, layer, regularizers.Context(teacher_layer="stage2"))
