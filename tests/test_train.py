"""Loss composition, state, the train step and its data parallelism.

The tests describe a run by an experiment config (``make_config``) and build
it as ``experiments/job.py`` does, through the library's explicit arguments
(``setup``)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data, terms
from experiments.configs import common
from ot_transfer_jax import losses, optim, parallel, regularizers, train
from ot_transfer_jax.models import create_model


NUM_CLASSES = 10
LAYERS = ("stage2", "stage3")


def make_config(method="ot", weight=0.1, layers=LAYERS, width=0.5,
                **options):
  """A digits config whose loss has one ``method`` term (none for "none")."""
  cfg = common.base_config()
  cfg.model.kwargs = {"width": width}
  cfg.loss.weight_decay = 5e-4
  cfg.loss.head_decay = 5e-4
  if method != "none":
    reads = regularizers.get(method).reads
    cfg.loss.terms[method] = common.term(
        method, weight, student_layers=layers if reads == "features" else (),
        **options)
  cfg.optimizer.learning_rate = 0.1
  cfg.optimizer.warmup_steps = 10
  return cfg


@pytest.fixture(scope="module")
def digits():
  ds = data.get_datasets({"name": "digits"})
  return ds


def batches(ds, batch_size=64, seed=0):
  return data.train_batches(ds.train, global_batch_size=batch_size, seed=seed,
                            augment="none", image_size=None, mean=ds.mean,
                            std=ds.std)


def setup(cfg, steps, teacher_vars=None, mesh=None, seed=0,
          init_from_teacher=False):
  mesh = mesh or parallel.make_mesh()
  model = create_model(cfg.model.name, NUM_CLASSES, **cfg.model.kwargs)
  teacher = create_model("digits_cnn", NUM_CLASSES)
  sample = jnp.zeros((64, 8, 8, 1))
  if teacher_vars is None:
    teacher_vars = teacher.init(jax.random.PRNGKey(1), sample[:1])
  loss_terms = terms.terms_from_config(cfg.loss.terms)
  tx = optim.make_optimizer(steps, **cfg.optimizer)
  state = train.create_train_state(
      model, teacher, teacher_vars, loss_terms, jax.random.PRNGKey(seed),
      sample, tx, init_variables=teacher_vars if init_from_teacher else None)
  step = train.make_train_step(loss_fn(cfg, model, teacher), tx, mesh)
  return model, teacher, teacher_vars, state, step, mesh


def loss_fn(cfg, model, teacher):
  return train.make_loss_fn(
      model, teacher, terms.terms_from_config(cfg.loss.terms),
      label_smoothing=cfg.loss.label_smoothing,
      weight_decay=cfg.loss.weight_decay, head_decay=cfg.loss.head_decay,
      bn_train=not cfg.model.freeze_batchnorm)


def run(cfg, ds, steps, teacher_vars=None, mesh=None):
  model, _, teacher_vars, state, step, mesh = setup(cfg, steps, teacher_vars,
                                                    mesh)
  state = parallel.replicate(state, mesh)
  teacher_vars = parallel.replicate(teacher_vars, mesh)
  history = []
  for _, batch in zip(range(steps), batches(ds)):
    state, metrics = step(state, teacher_vars, parallel.shard_batch(batch, mesh))
    history.append(jax.device_get(metrics))
  return model, state, history


@pytest.mark.slow
def test_ot_training_on_digits_reaches_90_percent(digits):
  teacher_cfg = make_config("none", width=1.0)
  teacher_model, teacher_state, _ = run(teacher_cfg, digits, 200)
  cfg = make_config("ot")
  model, state, history = run(cfg, digits, 200,
                              teacher_vars=teacher_state.variables)
  mesh = parallel.make_mesh()
  eval_step = parallel.make_eval_step(model, mesh)
  test = parallel.evaluate(eval_step, state.variables,
                        data.eval_batches(digits.test, batch_size=128,
                                          image_size=None, mean=digits.mean,
                                          std=digits.std), mesh)
  assert test["count"] == len(digits.test)
  assert test["accuracy"] > 0.90
  last = history[-1]
  for key in ("reg/ot/stage2->stage2", "sinkhorn_iters/ot/stage3->stage3",
              "grad_norm", "ce", "accuracy"):
    assert np.isfinite(last[key]), key
  # Unequal widths (student at half width): no matched fraction.
  assert np.isnan(last["matched_fraction/ot/stage3->stage3"])
  assert history[-1]["reg/ot"] < history[0]["reg/ot"]
  assert all(h["skipped"] == 0 for h in history)


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_identical_student_has_matched_fraction_one(digits):
  # Conv stages: at initialisation the dense stage3 has dead ReLU units,
  # which are indistinguishable, so the plan rightly splits their mass
  # (tests/test_ot.py::test_duplicate_neurons_share_mass).
  cfg = make_config("ot", weight=1.0, layers=("stage1", "stage2"), width=1.0)
  cfg.model.freeze_batchnorm = True
  model, teacher, teacher_vars, state, step, mesh = setup(
      cfg, 5, init_from_teacher=True)
  _, metrics = step(state, teacher_vars,
                    parallel.shard_batch(next(batches(digits)), mesh))
  for key in ("stage1->stage1", "stage2->stage2"):
    assert float(metrics[f"matched_fraction/ot/{key}"]) == pytest.approx(
        1.0, abs=0.02)


@pytest.mark.parametrize("method", ["feature_matching", "attention", "fitnets"])
def test_baseline_methods_train(digits, method):
  cfg = make_config(method, layers=("stage2",),
                    width=1.0 if method == "feature_matching" else 0.5)
  _, state, history = run(cfg, digits, 3)
  assert int(state.step) == 3
  assert all(np.isfinite(h[f"reg/{method}"]) and h[f"reg/{method}"] > 0
             for h in history)
  if method == "fitnets":
    kernel = state.reg_params["fitnets"]["stage2->stage2"]["Dense_0"]["kernel"]
    assert kernel.shape == (16, 32)  # Half-width student -> teacher.


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_loss_is_the_weighted_sum_of_its_logged_terms(digits):
  """ce + sum_t weight_t * reg/t + weight_decay + head_decay, each checked by
  hand: KD from the logits, L2-SP from the parameters."""
  cfg = make_config("ot", weight=0.3, width=1.0)
  cfg.loss.terms.kd = common.term("kd", 0.7, temperature=2.0)
  cfg.loss.terms.l2_sp = common.term("l2_sp", 0.05)
  cfg.model.freeze_batchnorm = True  # So the student's logits are model.apply's.
  model, teacher, teacher_vars, state, _, _ = setup(cfg, 3)
  # A student away from the teacher, so that L2-SP is not 0.
  state = state.replace(params=jax.tree_util.tree_map(
      lambda x: 1.1 * x, teacher_vars["params"]))
  batch = next(batches(digits))
  loss, (m, _, _) = loss_fn(cfg, model, teacher)(
      state.trainable, state.batch_stats, state.reg_state, teacher_vars, batch,
      jax.random.PRNGKey(0))
  assert float(loss) == pytest.approx(float(
      m["ce"] + 0.3 * m["reg/ot"] + 0.7 * m["reg/kd"] + 0.05 * m["reg/l2_sp"]
      + m["weight_decay"] + m["head_decay"]), rel=1e-6)
  # KD: T^2 KL(softmax(t/T) || softmax(s/T)) by hand, float64.
  s_logits = np.asarray(model.apply(state.variables, batch["image"]), np.float64)
  t_logits = np.asarray(teacher.apply(teacher_vars, batch["image"]), np.float64)
  log_softmax = lambda z: z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - z.max(-1, keepdims=True)
  p_t = np.exp(log_softmax(t_logits / 2))
  kl = np.sum(p_t * (log_softmax(t_logits / 2) - log_softmax(s_logits / 2)), -1)
  assert float(m["reg/kd"]) == pytest.approx(4 * kl.mean(), rel=1e-4)
  # L2-SP: ||0.1 theta_backbone||^2 / 2; decays: beta/2 ||.||^2.
  backbone, head = regularizers.split_head(teacher_vars["params"])
  sq = lambda tree: sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                        for x in jax.tree_util.tree_leaves(tree))
  assert float(m["reg/l2_sp"]) == pytest.approx(0.5 * 0.01 * sq(backbone),
                                                rel=1e-5)
  assert float(m["weight_decay"]) == pytest.approx(
      5e-4 * 0.5 * 1.21 * sq(backbone), rel=1e-5)
  assert float(m["head_decay"]) == pytest.approx(5e-4 * 0.5 * 1.21 * sq(head),
                                                 rel=1e-5)
  # Omega_P's value is the layer-weighted sum of its logged per-layer values.
  assert float(m["reg/ot"]) == pytest.approx(
      float(m["reg/ot/stage2->stage2"] + m["reg/ot/stage3->stage3"]), rel=1e-6)


def test_unknown_layer_lists_available(digits):
  cfg = make_config("ot", layers=("stage9",))
  with pytest.raises(ValueError) as err:
    setup(cfg, 1)
  msg = str(err.value)
  assert "'stage9'" in msg and "stage3" in msg and "student" in msg


def test_feature_matching_refuses_unequal_widths():
  cfg = make_config("feature_matching")  # student is half the teacher's width
  with pytest.raises(ValueError, match="widths must be equal"):
    setup(cfg, 1)


def test_unknown_regularizer_and_option_rejected():
  cfg = make_config("ot")
  with cfg.unlocked():
    cfg.loss.terms.ot.regularizer = "delta_plus"
  with pytest.raises(ValueError, match="loss.terms.ot: Unknown regularizer "
                     "'delta_plus'; registered: .*'ot'"):
    setup(cfg, 1)
  with pytest.raises(ValueError, match="no option.*'epsilonn'"):
    make_config("ot", epsilonn=0.1)
  cfg = make_config("kd")
  cfg.loss.terms.kd.student_layers = ("stage2",)
  with pytest.raises(ValueError, match="'kd' reads logits, not layers"):
    setup(cfg, 1)
  cfg = make_config("kd")
  cfg.loss.terms.kd.layer_weights = (2.0,)  # Would be ignored: refused.
  with pytest.raises(ValueError, match="'kd' reads logits, not layers"):
    setup(cfg, 1)


def test_transfer_init_copies_backbone_and_keeps_new_head():
  teacher = create_model("digits_cnn", 5)
  student = create_model("digits_cnn", 5)
  x = jnp.zeros((1, 8, 8, 1))
  t_vars = teacher.init(jax.random.PRNGKey(0), x)
  s_vars = student.init(jax.random.PRNGKey(1), x)
  merged = train.transfer_init(s_vars, t_vars)
  np.testing.assert_array_equal(merged["params"]["stage1"]["conv"]["kernel"],
                                t_vars["params"]["stage1"]["conv"]["kernel"])
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"],
                                s_vars["params"]["head"]["kernel"])
  small = create_model("digits_cnn", 5, width=0.5).init(jax.random.PRNGKey(1),
                                                         x)
  with pytest.raises(ValueError, match="shape"):
    train.transfer_init(small, t_vars)


@pytest.mark.slow  # 4-9 s of compilation: full suite only.
def test_non_finite_step_is_skipped(digits):
  cfg = make_config("ot")
  model, teacher, teacher_vars, state, step, mesh = setup(cfg, 3)
  before = jax.device_get(state.params)
  batch = next(batches(digits))
  batch["image"] = batch["image"].copy()
  batch["image"][0, 0, 0, 0] = np.nan
  state, metrics = step(state, teacher_vars, parallel.shard_batch(batch, mesh))
  assert float(metrics["skipped"]) == 1.0
  assert int(state.bad_steps) == 1 and int(state.step) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                         jax.device_get(state.params))


MULTI_DEVICE = textwrap.dedent("""
    import jax, numpy as np
    assert jax.device_count() == 2, jax.devices()
    sys_path = {path!r}
    import sys; sys.path.insert(0, sys_path)
    import test_train as t
    from ot_transfer_jax import parallel
    ds = t.data.get_datasets({{"name": "digits"}})
    cfg = t.make_config("ot")
    out = {{}}
    for n in (1, 2):
      mesh = parallel.make_mesh(jax.devices()[:n])
      model, teacher, tv, state, step, _ = t.setup(cfg, 5, mesh=mesh)
      state, tv = parallel.replicate(state, mesh), parallel.replicate(tv, mesh)
      losses = []
      for _, b in zip(range(5), t.batches(ds)):
        state, m = step(state, tv, parallel.shard_batch(b, mesh))
        losses.append(float(m["loss"]))
      assert step._cache_size() == 1, step._cache_size()
      out[n] = (np.array(losses), jax.device_get(state.params))
    np.testing.assert_allclose(out[2][0], out[1][0], rtol=1e-4)
    # 1e-4 relative over the whole parameter vector (entries near 0 have no
    # meaningful relative error of their own).
    flat = lambda t: np.concatenate([np.ravel(x) for x in
                                     jax.tree_util.tree_leaves(t)])
    diff = np.linalg.norm(flat(out[2][1]) - flat(out[1][1]))
    assert diff <= 1e-4 * np.linalg.norm(flat(out[1][1])), diff
    print("OK", out[1][0])
""")


@pytest.mark.slow
def test_two_devices_match_one_device_and_compile_once():
  env = dict(os.environ,
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  here = os.path.dirname(os.path.abspath(__file__))
  proc = subprocess.run(
      [sys.executable, "-c", MULTI_DEVICE.format(path=here)], env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "OK" in proc.stdout


ANY_DEVICE_COUNT = textwrap.dedent("""
    import jax, numpy as np
    n = jax.device_count()
    import sys; sys.path.insert(0, {path!r})
    import test_train as t
    from ot_transfer_jax import parallel
    # 25 = 5 x 5 divides over 1 of 2 or 4 devices; 24 over all; 10 over 2.
    assert parallel.make_mesh(batch_size=25).devices.size == 1
    assert parallel.make_mesh(batch_size=24).devices.size == n
    assert parallel.make_mesh(batch_size=10).devices.size == 2
    assert parallel.make_mesh(batch_size=24, max_devices=1).devices.size == 1
    assert parallel.make_mesh(batch_size=24, max_devices=3).devices.size == min(n, 3)
    ds = t.data.get_datasets({{"name": "digits"}})
    cfg = t.make_config("ot")
    meshes = {{"one": parallel.make_mesh(jax.devices()[:1])}}
    if n > 2:  # Training on 2 of 4 devices (on 2 of 2 it is the usual case).
      meshes["picked"] = parallel.make_mesh(batch_size=10)
    params = {{}}
    for name, mesh in meshes.items():
      model, _, tv, state, step, _ = t.setup(cfg, 2, mesh=mesh)
      state, tv = parallel.replicate(state, mesh), parallel.replicate(tv, mesh)
      for _, b in zip(range(2), t.batches(ds, batch_size=10)):
        state, m = step(state, tv, parallel.shard_batch(b, mesh))
      params[name] = jax.device_get(state.params)
    if n > 2:
      flat = lambda t: np.concatenate([np.ravel(x) for x in
                                       jax.tree_util.tree_leaves(t)])
      diff = np.linalg.norm(flat(params["picked"]) - flat(params["one"]))
      assert diff <= 1e-4 * np.linalg.norm(flat(params["one"])), diff
    # Evaluation pads each 25-row batch with masked rows over all n devices.
    variables = {{"params": params["one"], "batch_stats": state.batch_stats}}
    evals = []
    for mesh in (meshes["one"], parallel.make_mesh()):
      batches = t.data.eval_batches(ds.test, batch_size=25, image_size=None,
                                    mean=ds.mean, std=ds.std)
      evals.append(parallel.evaluate(parallel.make_eval_step(model, mesh),
                                  jax.device_get(variables), batches, mesh))
    one, full = evals
    assert full["count"] == one["count"] == len(ds.test), (full, one)
    assert full["accuracy"] == one["accuracy"], (full, one)
    np.testing.assert_allclose(full["loss"], one["loss"], rtol=1e-5)
    print("OK", n, one)
""")


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 4])
def test_a_batch_that_does_not_divide_over_the_devices_runs_exactly(devices):
  """make_mesh(batch_size=B) trains on the largest device subset B divides
  over (no padding in the loss); evaluation pads with masked rows."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             f" --xla_force_host_platform_device_count={devices}")
  here = os.path.dirname(os.path.abspath(__file__))
  proc = subprocess.run(
      [sys.executable, "-c", ANY_DEVICE_COUNT.format(path=here)], env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith(f"OK {devices}")


@pytest.mark.slow
def test_unbalanced_ot_term_trains_and_logs_its_mass(digits):
  # tau=0.99 (0.8 leaves ~0.1 % of the mass: every step then converges in
  # the minimum 2 iterations, warm or not).
  cfg = make_config("ot", layers=("stage2",), tau=0.99)
  _, state, history = run(cfg, digits, 3)
  assert int(state.step) == 3
  mass = [float(h["transported_mass/ot/stage2->stage2"]) for h in history]
  assert all(0.0 < m < 0.99 for m in mass)
  assert all(np.isfinite(h["reg/ot"]) and h["reg/ot"] > 0 for h in history)
  assert all(h["sinkhorn_converged/ot/stage2->stage2"] == 1 for h in history)
  # Warm starts: later steps start from the previous step's potentials.
  iters = [int(h["sinkhorn_iters/ot/stage2->stage2"]) for h in history]
  assert max(iters[1:]) < iters[0]


def test_invalid_tau_rejected_when_the_config_is_written():
  with pytest.raises(ValueError, match=r"tau must lie in \(0, 1\]"):
    make_config("ot", tau=0.0)
