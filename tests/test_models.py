"""Model zoo: parameter counts against published ones, shapes, names, BN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ot_transfer_jax.models import (
    MODEL_NAMES,
    CifarResNet,
    ResNet,
    WideResNet,
    count_params,
    create_model,
)

from model_support import abstract_variables, random_variables

_IMAGENET = ("resnet18", "resnet34", "resnet50", "resnet101")


def _input_shape(name, batch=2):
  if name.startswith("digits"):
    return (batch, 8, 8, 1)
  if name in ("small_cnn", "vit"):
    return (batch, 28, 28, 1)
  return (batch, 64, 64, 3) if name in _IMAGENET else (batch, 32, 32, 3)


# (name, num_classes, millions): He et al. 2016 (CIFAR-10), RepDistiller
# (CIFAR-100), Zagoruyko & Komodakis 2016 (CIFAR), torchvision (ImageNet).
_PUBLISHED = [
    ("resnet20", 10, 0.27),
    ("resnet56", 10, 0.86),
    ("resnet110", 10, 1.7),
    ("resnet8x4", 100, 1.23),
    ("resnet32x4", 100, 7.4),
    ("wrn_16_2", 100, 0.70),
    ("wrn_40_2", 10, 2.2),
    ("resnet18", 1000, 11.69),
    ("resnet50", 1000, 25.557),
    ("resnet101", 1000, 44.55),
]


@pytest.mark.parametrize("name,num_classes,millions", _PUBLISHED)
def test_param_count_matches_published(name, num_classes, millions):
  model = create_model(name, num_classes)
  params = abstract_variables(model, _input_shape(name, 1))["params"]
  assert count_params(params) == pytest.approx(millions * 1e6, rel=0.02)


@pytest.mark.parametrize(
    "name,exact",
    [("resnet18", 11_689_512), ("resnet50", 25_557_032),
     ("resnet101", 44_549_160)],
)
def test_imagenet_param_count_equals_torchvision(name, exact):
  model = create_model(name, 1000)
  params = abstract_variables(model, (1, 224, 224, 3))["params"]
  assert count_params(params) == exact


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_and_layout(name):
  model = create_model(name, 7)
  shape = _input_shape(name)
  variables = abstract_variables(model, shape)
  logits = jax.eval_shape(model.apply, variables, jnp.zeros(shape))
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32

  params = variables["params"]
  assert params["head"]["kernel"].shape[-1] == 7
  if name.endswith("vit"):  # Transformer blocks instead of stages.
    assert {"embed", "block0", "block1", "norm"} <= set(params)
    return
  assert {"stage1", "stage2"} <= set(params)
  if not name.startswith(("digits", "small_cnn")):
    assert "block0" in params["stage1"]
    assert "batch_stats" in variables


def test_stage_names_per_family():
  def stages(name):
    model = create_model(name, 10)
    params = abstract_variables(model, _input_shape(name, 1))["params"]
    return sorted(k for k in params if k.startswith("stage"))

  assert stages("resnet20") == ["stage1", "stage2", "stage3"]
  assert stages("wrn_40_2") == ["stage1", "stage2", "stage3"]
  assert stages("resnet50") == ["stage1", "stage2", "stage3", "stage4"]
  assert stages("digits_cnn") == ["stage1", "stage2", "stage3"]
  assert stages("digits_mlp") == ["stage1", "stage2"]
  assert stages("small_cnn") == ["stage1", "stage2", "stage3"]

  model = create_model("resnet56", 10)
  stage3 = abstract_variables(model, (1, 32, 32, 3))["params"]["stage3"]
  assert sorted(stage3) == sorted(f"block{i}" for i in range(9))


def test_unknown_model_lists_available_names():
  with pytest.raises(ValueError, match="'resnet21'.*resnet20.*digits_cnn"):
    create_model("resnet21", 10)


# The shallowest member of each family: the code paths of the deep ones, with
# a fraction of their compile time.
_SMALL = {
    "digits_cnn": (create_model("digits_cnn", 10), (4, 8, 8, 1)),
    "digits_mlp": (create_model("digits_mlp", 10), (4, 8, 8, 1)),
    "small_cnn": (create_model("small_cnn", 10, width=0.25), (4, 12, 12, 1)),
    "cifar_resnet": (CifarResNet(10, depth=8), (4, 16, 16, 3)),
    "wrn": (WideResNet(10, depth=10, widen_factor=1), (4, 16, 16, 3)),
    "resnet": (ResNet(10, stage_sizes=(1, 1), bottleneck=True), (4, 32, 32, 3)),
}


@functools.cache
def _small_variables(name):
  model, shape = _SMALL[name]
  return random_variables(model, shape)


@pytest.mark.parametrize(
    "name", ["digits_cnn", "small_cnn", "cifar_resnet", "wrn", "resnet"])
def test_batch_stats_update_only_in_training(name):
  model, shape = _SMALL[name]
  variables = _small_variables(name)
  x = jax.random.normal(jax.random.key(1), shape) + 3.0

  @jax.jit
  def train(variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])

  logits, state = train(variables, x)
  assert logits.shape == (4, 10)
  old, new = variables["batch_stats"], state["batch_stats"]
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old, new)
  assert all(jax.tree.leaves(changed))

  # Evaluation reads the running statistics: an example's logits do not depend
  # on the rest of the batch.
  evaluate = jax.jit(model.apply)
  other = jnp.concatenate([x[:2], -x[2:]])
  np.testing.assert_allclose(
      evaluate(variables, x)[:2], evaluate(variables, other)[:2], rtol=1e-5,
      atol=1e-5)


def test_digits_width_changes_neuron_counts():
  def widths(width):
    model = create_model("digits_cnn", 10, width=width)
    params = abstract_variables(model, (1, 8, 8, 1))["params"]
    return (
        params["stage1"]["conv"]["kernel"].shape[-1],
        params["stage2"]["conv"]["kernel"].shape[-1],
        params["stage3"]["dense"]["kernel"].shape[-1],
    )

  assert widths(1.0) == (16, 32, 64)
  assert widths(0.5) == (8, 16, 32)
  assert widths(0.25) == (4, 8, 16)


@pytest.mark.parametrize("width", [1.0, 0.5, 2.0])
def test_small_cnn_params_and_stage_shapes_on_28x28(width):
  model = create_model("small_cnn", 10, width=width)
  variables = abstract_variables(model, (1, 28, 28, 1))
  c1, c2, c3 = (round(16 * width), round(32 * width), round(64 * width))
  # conv3x3 kernels (no bias), BN scale + bias, head kernel + bias.
  expected = 9 * (1 * c1 + c1 * c2 + c2 * c3) + 2 * (c1 + c2 + c3) + 10 * c3 + 10
  assert count_params(variables["params"]) == expected
  kernels = [variables["params"][f"stage{i}"]["conv"]["kernel"].shape[-1] for i in (1, 2, 3)]
  assert kernels == [c1, c2, c3]


def test_small_cnn_and_resnet8_stages_share_resolutions_on_28x28():
  """Layer-by-layer comparisons across the two families need equal positions."""
  from ot_transfer_jax.features import apply_with_features
  layers = ("stage1", "stage2", "stage3")
  shapes = {}
  for name, kwargs in (("small_cnn", {"width": 0.5}), ("resnet8", {})):
    model = create_model(name, 5, **kwargs)
    variables = abstract_variables(model, (1, 28, 28, 1))
    feats = jax.eval_shape(
        lambda v, x: apply_with_features(model, v, x, layers, train=False)[1], variables,
        jnp.zeros((2, 28, 28, 1)))
    shapes[name] = [feats[layer].shape[1:3] for layer in layers]
  assert shapes["small_cnn"] == shapes["resnet8"] == [(28, 28), (14, 14), (7, 7)]


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = create_model("resnet20", 10, dtype=jnp.bfloat16)
  variables = abstract_variables(model, (1, 32, 32, 3))
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  logits = jax.eval_shape(model.apply, variables, jnp.zeros((2, 32, 32, 3)))
  assert logits.dtype == jnp.float32


def test_wrn_dropout_is_active_only_in_training():
  # Dropout adds no variables: the dropout-free model's variables fit.
  model = _SMALL["wrn"][0].clone(dropout_rate=0.3)
  variables = _small_variables("wrn")
  x = jnp.ones((2, 16, 16, 3))

  @jax.jit
  def train(key):
    logits, _ = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
    )
    return logits

  assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)))
  evaluate = jax.jit(model.apply)
  np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mlp", "small_cnn"])
def test_digits_models_learn(name):
  """``model.init`` and 30 jitted Adam steps on one batch halve the loss."""
  model, shape = _SMALL[name]
  x = jax.random.normal(jax.random.key(0), (32, *shape[1:]))
  y = jnp.arange(32) % 10
  variables = jax.jit(model.init)(jax.random.key(1), x[:1])
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, model_state, opt_state):
    def loss_fn(params):
      logits, new_state = model.apply(
          {"params": params, **model_state}, x, train=True,
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new_state

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, new_state), grads = grad_fn(params)
    updates, opt_state = tx.update(grads, opt_state)
    params = optax.apply_updates(params, updates)
    return params, {**model_state, **new_state}, opt_state, loss

  losses = []
  for _ in range(30):
    params, model_state, opt_state, loss = step(params, model_state, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]


def test_count_params_on_arrays():
  assert count_params({"a": jnp.zeros((2, 3)), "b": {"c": np.zeros(4)}}) == 10
