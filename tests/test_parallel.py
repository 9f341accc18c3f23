"""The device mesh, batch sharding, padding and exact evaluation (one device
here; tests/test_train.py runs them on 2 and 4 simulated devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ot_transfer_jax import parallel
from ot_transfer_jax.models import create_model


def test_a_negative_max_devices_is_refused():
  with pytest.raises(ValueError, match=r"max_devices=-1: use 0 .* or a "
                     "positive limit"):
    parallel.make_mesh(batch_size=4, max_devices=-1)
  assert parallel.make_mesh(batch_size=4, max_devices=0).devices.size >= 1


def test_pad_batch_appends_masked_zero_rows():
  batch = {"image": np.ones((5, 2), np.float32), "label": np.arange(5)}
  padded = parallel.pad_batch(batch, 4)
  assert padded["image"].shape == (8, 2) and padded["label"].shape == (8,)
  np.testing.assert_array_equal(padded["mask"], [True] * 5 + [False] * 3)
  np.testing.assert_array_equal(padded["image"][5:], 0)
  assert parallel.pad_batch(batch, 5)["mask"].all()


def test_evaluate_counts_every_example_once_whatever_the_batching():
  model = create_model("digits_mlp", 3)
  x = np.random.default_rng(0).normal(size=(7, 8, 8, 1)).astype(np.float32)
  y = np.array([0, 1, 2, 0, 1, 2, 0], np.int32)
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
  mesh = parallel.make_mesh()
  step = parallel.make_eval_step(model, mesh)
  logits = np.asarray(model.apply(variables, x))
  expected = np.mean(logits.argmax(-1) == y)
  whole = parallel.evaluate(step, variables, [{"image": x, "label": y}], mesh)
  parts = parallel.evaluate(step, variables, [{"image": x[:3], "label": y[:3]},
                                              {"image": x[3:], "label": y[3:]}],
                            mesh)
  assert whole["count"] == parts["count"] == 7
  assert whole["accuracy"] == parts["accuracy"] == pytest.approx(expected)
  np.testing.assert_allclose(whole["loss"], parts["loss"], rtol=1e-6)
