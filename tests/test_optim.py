"""The optimiser: schedules, the slower backbone, gradient clipping, bad names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ot_transfer_jax import optim


def test_step_schedule_drops_at_its_boundaries_after_the_warmup():
  sched = optim.make_schedule(1.0, 100, schedule="step", step_boundaries=(0.5,),
                              step_factor=0.1)
  assert float(sched(10)) == pytest.approx(1.0)
  assert float(sched(60)) == pytest.approx(0.1)
  # Both boundaries round to step 3 of 10: the factors multiply there.
  sched = optim.make_schedule(1.0, 10, schedule="step",
                              step_boundaries=(0.29, 0.3), step_factor=0.1)
  assert float(sched(2)) == pytest.approx(1.0)
  assert float(sched(3)) == pytest.approx(0.01)
  sched = optim.make_schedule(1.0, 100, schedule="step", warmup_steps=10,
                              step_boundaries=(0.5,), step_factor=0.1)
  assert float(sched(5)) == pytest.approx(0.5)
  assert float(sched(49)) == pytest.approx(1.0)
  assert float(sched(50)) == pytest.approx(0.1)  # The drop stays at step 50.


def test_cosine_and_constant_schedules():
  sched = optim.make_schedule(2.0, 100)
  assert float(sched(0)) == pytest.approx(2.0)
  assert float(sched(50)) == pytest.approx(1.0)
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-7)
  sched = optim.make_schedule(2.0, 100, warmup_steps=10)
  assert float(sched(5)) == pytest.approx(1.0)
  assert float(sched(10)) == pytest.approx(2.0)
  sched = optim.make_schedule(2.0, 100, schedule="constant", warmup_steps=4)
  assert float(sched(2)) == pytest.approx(1.0)
  assert float(sched(90)) == pytest.approx(2.0)


def test_backbone_multiplier_and_gradient_clipping():
  params = {"model": {"head": jnp.ones(2), "stage1": jnp.ones(2)},
            "regularizers": {"fitnets": {"k": jnp.ones(1)}}}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  kw = dict(learning_rate=1.0, momentum=0.0, schedule="constant",
            backbone_lr_multiplier=0.1)
  tx = optim.make_optimizer(10, **kw)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["model"]["head"], -1.0)
  np.testing.assert_allclose(updates["model"]["stage1"], -0.1)
  # The terms' parameters (FitNets' regressors) train at the head's rate.
  np.testing.assert_allclose(updates["regularizers"]["fitnets"]["k"], -1.0)
  tx = optim.make_optimizer(10, grad_clip_norm=1.0, **kw)
  updates, _ = tx.update(jax.tree_util.tree_map(lambda g: 10 * g, grads),
                         tx.init(params), params)
  # Global norm of (10, 10, 10, 10, 10) is sqrt(500) -> scaled to 1.
  scale = 10 / np.sqrt(500)
  np.testing.assert_allclose(updates["model"]["head"], -scale, rtol=1e-6)
  np.testing.assert_allclose(updates["model"]["stage1"], -0.1 * scale,
                             rtol=1e-6)


def test_unknown_optimizer_and_schedule_are_refused_naming_the_choices():
  with pytest.raises(ValueError, match=r"optimizer.name='adam': only 'sgd'"):
    optim.make_optimizer(10, learning_rate=0.1, name="adam")
  with pytest.raises(ValueError, match=r"optimizer.schedule='linear' is not "
                     r"one of \('cosine', 'step', 'constant'\)"):
    optim.make_optimizer(10, learning_rate=0.1, schedule="linear")
