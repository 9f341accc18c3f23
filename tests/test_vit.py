"""The ViT: token layers as capture points, compared with CNN layers and trained from the CLI."""

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data
from ot_transfer_jax import inference, losses, ot
from ot_transfer_jax.features import apply_with_features, validate_layers
from ot_transfer_jax.models import ViT, create_model

from digits_job import main_command
from model_support import random_variables

X28 = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))


def _vit(width=16, depth=2):
  model = create_model("vit", 10, width=width, depth=depth)
  return model, random_variables(model, (1, 28, 28, 1))


def test_capture_points_are_token_layers():
  model, variables = _vit()
  layers = ("embed", "block0", "block0/hidden", "block1", "norm")
  logits, feats, state = apply_with_features(model, variables, X28, layers,
                                             train=True)
  assert logits.shape == (4, 10) and state == {}  # No BatchNorm.
  assert feats["embed"].shape == (4, 7, 7, 16)  # 4 x 4 patches of 28 x 28.
  assert feats["block0"].shape == feats["block1"].shape == (4, 49, 16)
  assert feats["block0/hidden"].shape == (4, 49, 32)  # mlp_ratio 2.


def test_tokens_are_the_patch_grid_in_row_major_order():
  # The first LayerNorm (identity affine at init) sees the embedded patches
  # as tokens: token 7 r + c is patch (r, c), as a CNN's flattened positions.
  model, variables = _vit()
  _, feats, _ = apply_with_features(model, variables, X28,
                                    ("embed", "block0/ln_attn"), train=False)
  grid = feats["embed"].reshape(4, 49, 16)
  mean = grid.mean(-1, keepdims=True)
  normed = (grid - mean) / jnp.sqrt(grid.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(feats["block0/ln_attn"], normed, atol=1e-4)


def test_digits_vit_on_8x8_has_a_4x4_token_grid():
  model = create_model("digits_vit", 10)
  x = jnp.zeros((2, 8, 8, 1))
  variables = random_variables(model, x.shape)
  _, feats, _ = apply_with_features(model, variables, x, ("block1",),
                                    train=False)
  assert feats["block1"].shape == (2, 16, 32)


def test_unknown_layer_lists_the_vit_capture_points():
  model, variables = _vit()
  with pytest.raises(ValueError) as err:
    validate_layers(model, variables, X28[:1], ["block0/hiden"])
  message = str(err.value)
  assert "did you mean 'block0/hidden'?" in message
  assert "block1/hidden" in message and "embed" in message


@pytest.mark.slow
def test_omega_p_between_vit_tokens_and_a_cnn_grid():
  # 49 tokens against small_cnn's 7 x 7 stage3: flatten pairs token i with
  # grid position i; against the 14 x 14 stage2 it must pool.
  vit, vit_vars = _vit()
  cnn = create_model("small_cnn", 10, width=0.5)
  cnn_vars = random_variables(cnn, (1, 28, 28, 1))
  _, s, _ = apply_with_features(vit, vit_vars, X28, ("block1",), train=False)
  _, t, _ = apply_with_features(cnn, cnn_vars, X28, ("stage2", "stage3"),
                                train=False)
  flat = ot.solve_neuron_ot(s["block1"], t["stage3"])
  assert flat.plan.shape == (16, 32) and np.isfinite(float(flat.value))
  # Same descriptors as the grid flattened into 49 positions.
  same = ot.solve_neuron_ot(s["block1"], t["stage3"].reshape(4, 49, 32))
  assert float(same.value) == pytest.approx(float(flat.value), rel=1e-6)
  with pytest.raises(ValueError, match="spatial='pool'"):
    ot.solve_neuron_ot(s["block1"], t["stage2"])
  pooled = ot.solve_neuron_ot(s["block1"], t["stage2"], spatial="pool")
  assert np.isfinite(float(pooled.value))


def test_omega_i_between_token_layers_of_different_widths_names_the_fix():
  student = jax.random.normal(jax.random.key(2), (4, 49, 16))
  teacher = jax.random.normal(jax.random.key(3), (4, 49, 32))
  with pytest.raises(ValueError, match="widths must be equal.*ot_regularizer"):
    losses.feature_matching(student, teacher)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"width": 18, "num_heads": 4}, "multiple of num_heads"),
    ({"patch_size": 5}, "must divide the image sides"),
])
def test_bad_vit_shapes_name_the_fix(kwargs, fragment):
  with pytest.raises(ValueError, match=fragment):
    jax.eval_shape(ViT(num_classes=10, **kwargs).init, jax.random.key(0),
                   X28[:1])


@pytest.mark.slow
def test_vit_trains_resumes_and_predicts_from_the_cli(tmp_path, teacher_dir):
  # digits_transfer's Omega_P method with a ViT student: its last block (4 x 4
  # tokens) against the CNN teacher's 4 x 4 stage2.
  workdir = tmp_path / "run"
  vit = ["--config.model.name=digits_vit", "--config.init_from_teacher=False",
         "--config.loss.terms.ot.student_layers=('block1',)",
         "--config.loss.terms.ot.teacher_layers=('stage2',)",
         "--config.loss.terms.ot.layer_weights=(1.0,)",
         "--config.analysis.layers=()"]
  for steps in (10, 20):  # The second run resumes the first's checkpoint.
    cmd = main_command(workdir, teacher_dir, *vit,
                       f"--config.num_steps={steps}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resuming" in proc.stderr or "resum" in proc.stderr.lower()
  restored = inference.restore(str(workdir))
  assert restored.step == 20 and restored.config.model.name == "digits_vit"
  images, labels = next(data.test_batches(restored, 64))
  accuracy = np.mean(restored.predict(images) == labels)
  assert accuracy > 0.3  # 5 classes: above chance after 20 steps.


@pytest.mark.parametrize("student,teacher,ok", [
    ((4, 49, 16), (4, 7, 7, 32), True),   # h * w tokens vs an h x w grid
    ((4, 7, 7, 16), (4, 49, 32), True),
    ((4, 49, 16), (4, 49, 32), True),
    ((4, 48, 16), (4, 7, 7, 32), False),  # another number of positions
    ((4, 49, 16), (4, 32), False),        # tokens vs a dense layer
])
def test_flatten_accepts_tokens_against_the_grid_they_flatten(student,
                                                              teacher, ok):
  if ok:
    ot.check_activation_shapes(student, teacher, "flatten")
  else:
    with pytest.raises(ValueError, match="spatial='pool'"):
      ot.check_activation_shapes(student, teacher, "flatten")
  ot.check_activation_shapes(student, teacher, "pool")
