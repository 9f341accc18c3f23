"""The README's code runs as written."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_block(after_heading: str) -> str:
  text = README.read_text()
  section = text.split(after_heading, 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_optax_example_trains():
  namespace = {}
  exec(compile(_python_block("## Use the regulariser"), "README.md", "exec"),
       namespace)
  losses = namespace["losses"]
  assert len(losses) == 100
  assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow
def test_multi_device_example_matches_one_device():
  namespace = {}
  exec(compile(_python_block("### Several devices"), "README.md", "exec"),
       namespace)
  ref = namespace["grads_ref"]
  for how in ("pmap", "shard"):
    assert abs(float(namespace[f"loss_{how}"]) - float(namespace["loss_ref"])
               ) <= 1e-5 * abs(float(namespace["loss_ref"]))
    for key in ref:
      got, want = np.asarray(namespace[f"grads_{how}"][key]), np.asarray(
          ref[key])
      assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), (
          how, key)


def test_nnx_example_trains_with_the_reference_gradient():
  namespace = {}
  exec(compile(_python_block("### Flax NNX"), "README.md", "exec"), namespace)
  losses = namespace["losses"]
  assert len(losses) == 100
  assert losses[-1] < 0.8 * losses[0]

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from ot_transfer_jax import solve_neuron_ot

  model, x, y = namespace["model"], namespace["x"], namespace["y"]
  teacher = namespace["teacher_feats"]
  grads = nnx.jit(nnx.grad(namespace["loss_fn"]))(model)

  # Reference: the same network in plain JAX, with Omega_P's gradient in
  # closed form (envelope theorem, plan held fixed):
  # dOmega/da_j = (2/D) sum_k P_jk (a_j - t_k), i.e. for feats (D, n_s):
  # (2/D) (feats * rowsum(P) - teacher @ P^T).
  params = nnx.state(model, nnx.Param)
  p = {(layer, name): jnp.asarray(params[layer][name][...])
       for layer in ("hidden", "head") for name in ("kernel", "bias")}

  def forward(p):
    feats = jax.nn.relu(x @ p["hidden", "kernel"] + p["hidden", "bias"])
    return feats, feats @ p["head", "kernel"] + p["head", "bias"]

  feats, _ = forward(p)
  plan = solve_neuron_ot(feats, teacher).plan
  d_omega = (2 / feats.shape[0]) * (feats * plan.sum(1) - teacher @ plan.T)

  def surrogate(p):
    feats, logits = forward(p)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.1 * jnp.sum(jax.lax.stop_gradient(d_omega) * feats)

  reference = jax.grad(surrogate)(p)
  assert float(jnp.abs(d_omega).max()) > 0  # The regulariser is active.
  for (layer, name), ref in reference.items():
    got = np.asarray(grads[layer][name][...])
    np.testing.assert_allclose(got, ref, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(ref).max()),
                               err_msg=f"{layer}/{name}")


def _bash_block(after: str) -> str:
  section = README.read_text().split(after, 1)[1]
  return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_install_and_test_commands():
  # CI (.ci/run) must run what the README tells a new user to run.
  install, test = _bash_block("Install the test extra").split(" && ")
  ci = (README.parent / ".ci" / "run").read_text().splitlines()
  commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
  # `pip ...` and `python ...` there are `python3 -m pip ...` and `python3 ...` here.
  expected = ["python3 -m " + c if c.startswith("pip ") else
              c.replace("python ", "python3 ", 1) for c in (install, test)]
  assert commands == expected
  assert "-c constraints.txt" in install
  assert (README.parent / "constraints.txt").exists()
