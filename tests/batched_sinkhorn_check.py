"""The batched Sinkhorn solve of 3 layer pairs under ``shard_map`` on 2
simulated CPU devices, against one device on the global batch.

Run as a script (``tests/test_batched_sinkhorn.py`` does, in a subprocess):
the device count must be set before JAX initialises. Prints one JSON line per
case, ``{"case": ..., "value_rel": ..., "grad_rel": ..., "converged": ...}``
(largest relative errors over the layers of the values and of the
concatenated per-shard gradients), then ``{"done": true}``.
"""

from two_devices import AXIS, MESH, emit  # first: sets the device count

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ot_transfer_jax import batched_sinkhorn

RNG = np.random.default_rng(0)
WIDTHS = ((8, 12), (16, 16), (32, 24))
# Near the fixed point, so that a different summation order (a psum) cannot
# move where the stopping rule fires (see multidevice_check.py); at the
# default relative_epsilon (0.01) a float32 solve of these small batches does
# not reach 1e-4 within the budget.
OPTIONS = {"threshold": 1e-4, "relative_epsilon": 0.05}


def relu_pair(n_s, n_t, batch=16, latent=6):
  z = RNG.normal(size=(batch, latent))
  w_t = RNG.normal(size=(latent, n_t))
  w_s = w_t[:, RNG.integers(0, n_t, n_s)]
  s = np.maximum(z @ w_s + 0.5 * RNG.normal(size=(batch, n_s)), 0)
  return (jnp.asarray(s, jnp.float32),
          jnp.asarray(np.maximum(z @ w_t, 0), jnp.float32))


def relative(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def main():
  pairs = [relu_pair(*w) for w in WIDTHS]
  students = [s for s, _ in pairs]
  teachers = [t for _, t in pairs]
  cold = batched_sinkhorn.solve_layers(students, teachers, **OPTIONS)
  inits = [r.potentials for r in cold]
  moved = [s * 1.01 + 0.01 for s in students]

  for name, xs, init in (("cold", students, None), ("warm", moved, inits)):

    def loss(xs, ts, init, axis_name):
      out = batched_sinkhorn.solve_layers(xs, ts, inits=init,
                                          axis_name=axis_name, **OPTIONS)
      return (sum(r.value for r in out),
              ([r.value for r in out], [r.converged for r in out]))

    grad = jax.value_and_grad(loss, has_aux=True)
    (_, (ref_values, _)), ref_grads = jax.jit(
        lambda xs, ts, init: grad(xs, ts, init, None))(xs, teachers, init)
    init_spec = None if init is None else [(P(), P())] * len(init)
    (_, (values, converged)), grads = jax.jit(jax.shard_map(
        lambda xs, ts, init: grad(xs, ts, init, AXIS), mesh=MESH,
        in_specs=([P(AXIS)] * 3, [P(AXIS)] * 3, init_spec),
        out_specs=((P(), ([P()] * 3, [P()] * 3)), [P(AXIS)] * 3)))(
            xs, teachers, init)
    emit({"case": f"shard_map/{name}",
          "value_rel": max(relative(v, r) for v, r in zip(values,
                                                          ref_values)),
          "grad_rel": max(relative(g, r) for g, r in zip(grads, ref_grads)),
          "converged": bool(all(converged))})
  emit({"done": True})


if __name__ == "__main__":
  main()
