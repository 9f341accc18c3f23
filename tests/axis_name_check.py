"""Misuse of ``axis_name`` on 2 simulated CPU devices.

Run as a script (``tests/test_multidevice.py`` does, in a subprocess): the
device count must be set before JAX initialises. Prints one JSON line per
case, then ``{"done": true}``:

* ``{"case": "no_axis_name/<fn>", "error": message}``: every function that
  takes ``axis_name``, under ``shard_map`` with the batch split over "batch"
  and no ``axis_name``: the ``ValueError`` (None if it did not raise);
* ``{"case": "partial_axis_name", "error": message}``: the batch split over
  two mesh axes, ``axis_name`` naming one;
* ``{"case": "per_device/<how>", "rel": ...}``: without ``axis_name`` under
  ``pmap`` and ``shard_map(check_vma=False)``, the relative difference
  between each device's value and the single-device value of its shard;
* ``{"case": "nnx_recipe", ...}``: docs/usage.md's NNX + shard_map block,
  its value and gradient against one device, and its training losses.
"""

from two_devices import AXIS, MESH, emit  # first: sets the device count

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ot_transfer_jax import losses, ot

RNG = np.random.default_rng(0)
S = jnp.asarray(RNG.random((4, 2, 2, 6)), jnp.float32)  # (m, h, w, n)
T = jnp.asarray(RNG.random((4, 2, 2, 6)), jnp.float32)

FUNCTIONS = {
    "solve_neuron_ot": lambda s, t: ot.solve_neuron_ot(s, t).value,
    "ot_regularizer": losses.ot_regularizer,
    "neuron_descriptors": lambda s, t: jnp.sum(ot.neuron_descriptors(s)),
    "cost_matrix": lambda s, t: jnp.sum(ot.cost_matrix(
        s.reshape(-1, 6), t.reshape(-1, 6))),
    "feature_matching": losses.feature_matching,
    "delta": lambda s, t: losses.delta(s, t, jnp.full((6,), 1 / 6)),
    "attention_transfer": losses.attention_transfer,
    "fitnets_hint": losses.fitnets_hint,
}


def error_of(fn, mesh, spec, *args, **kwargs):
  try:
    jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec),
                          out_specs=P(), **kwargs))(*args)
  except ValueError as e:
    return str(e)
  return None


def no_axis_name_cases():
  for name, fn in FUNCTIONS.items():
    emit({"case": f"no_axis_name/{name}",
                      "error": error_of(fn, MESH, P(AXIS), S, T)})


def partial_axis_name_case():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(2, 1),
                           ("data", "model"))
  fn = lambda s, t: losses.ot_regularizer(s, t, axis_name="data")
  emit({"case": "partial_axis_name", "error": error_of(
      fn, mesh, P(("data", "model")), S, T)})


def per_device_cases():
  """Without axis_name where nothing is detectable: each shard's own value."""
  shards = [ot.solve_neuron_ot(S[i:i + 2], T[i:i + 2]).value
            for i in (0, 2)]
  pmapped = jax.pmap(losses.ot_regularizer)(S.reshape(2, 2, 2, 2, 6),
                                            T.reshape(2, 2, 2, 2, 6))
  untyped = jax.jit(jax.shard_map(
      lambda s, t: losses.ot_regularizer(s, t)[None], mesh=MESH,
      in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS), check_vma=False))(S, T)
  for how, values in (("pmap", pmapped), ("shard_map_check_vma_off", untyped)):
    rel = max(abs(float(v) - float(r)) / abs(float(r))
              for v, r in zip(values, shards))
    emit({"case": f"per_device/{how}", "rel": rel})


def nnx_recipe_case():
  """docs/usage.md's NNX + shard_map recipe, on 2 devices."""
  from doc_support import run_block  # this script's directory: tests/
  ns = run_block("### NNX modules under `shard_map`")
  flat = lambda tree: np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(tree)])
  value = abs(float(ns["loss_shard"]) - float(ns["loss_ref"])) / abs(
      float(ns["loss_ref"]))
  grad = np.linalg.norm(flat(ns["grads_shard"]) - flat(ns["grads_ref"])) / (
      np.linalg.norm(flat(ns["grads_ref"])))
  emit({"case": "nnx_recipe", "devices": ns["n_dev"],
                    "value_rel": value, "grad_rel": float(grad),
                    "first_loss": ns["losses"][0],
                    "last_loss": ns["losses"][-1]})


if __name__ == "__main__":
  assert len(jax.devices()) >= 2, jax.devices()
  no_axis_name_cases()
  partial_axis_name_case()
  per_device_cases()
  nnx_recipe_case()
  emit({"done": True})
