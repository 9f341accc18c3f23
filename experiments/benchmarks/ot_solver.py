"""Omega_P value + gradient against POT and against the cost matrix alone.

  python -m experiments.benchmarks.ot_solver [--neurons 64,256,512,1024,2048,4096]
      [--batch 64] [--repeats 20] [--out benchmarks_out]

For each width n (equal widths n:n and 2:1 widths n:n/2), on the same ReLU
activations of one mini-batch, after compilation, the median of `repeats`:

* `ot_ms`: `jax.value_and_grad(ot_regularizer)` from a cold start;
* `warm_ms`: the same inside a training loop: the activations moved by a
  small step between calls, the previous potentials passed as `init`;
* `cost_ms`: the cost matrix alone (one GEMM): the floor;
* `ott_ms`: ott-jax's own `Sinkhorn()` with its default settings (the
  library Omega_P builds on: threshold 1e-3, checks every 10 iterations, no
  Anderson, no epsilon scaling) on the same cost matrix and epsilon, value
  only, from a cold start; `ott_iters` its iterations; jitted, like ours;
  `speedup_vs_ott` = `ott_ms / ot_ms` (ours includes the gradient);
* `pot_sinkhorn_ms` (`ot.sinkhorn2`, log-domain, same epsilon) and
  `pot_emd_ms` (`ot.emd2`, exact), numpy, when POT is installed (the test
  extra; left out otherwise);
* `iters` / `warm_iters`: Sinkhorn iterations; `err_pct`: relative error of
  Omega_P against the exact OT value;
* `temp_mb`: peak temporary memory of the compiled step (XLA's count).

Writes `OUT/ot_solver.json` and `OUT/ot_solver.md`.
"""

import argparse
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.common import median_seconds, relu_activations, write
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

from ot_transfer_jax import cost_matrix, neuron_descriptors, solve_neuron_ot


@jax.jit
def _ott_default(cost, epsilon):
  """ott-jax's ``Sinkhorn()`` as shipped: ``(<P, C>, iterations)``."""
  out = sinkhorn.Sinkhorn()(linear_problem.LinearProblem(
      geometry.Geometry(cost_matrix=cost, epsilon=epsilon)))
  return jnp.sum(out.matrix * cost), out.n_iters


def _pot():
  """POT (the exact reference) when installed, else None: the benchmarks run
  without it, e.g. on an accelerator machine with only the core installed."""
  try:
    import ot as pot  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return pot


def bench_pair(student, teacher, repeats, pot_max_neurons, options):
  s, t = jnp.asarray(student), jnp.asarray(teacher)
  def objective(s, t, init):
    res = solve_neuron_ot(s, t, init=init, **options)
    return res.value, res

  grad = jax.jit(jax.value_and_grad(objective, has_aux=True))
  (value, res), _ = grad(s, t, None)  # Cold: no potentials to start from.
  ot_s = median_seconds(lambda: grad(s, t, None), repeats)

  # Warm: as in training, the student moves a little between calls.
  step = 1e-3 * jnp.asarray(np.random.default_rng(1).normal(size=s.shape),
                            jnp.float32)
  state = {"s": s, "init": res.potentials, "iters": []}

  def warm_call():
    state["s"] = state["s"] + step
    (_, r), g = grad(state["s"], t, state["init"])
    state["init"] = r.potentials
    state["iters"].append(r.n_iters)
    return g

  for _ in range(3):
    jax.block_until_ready(warm_call())
  state["iters"].clear()
  warm_s = median_seconds(warm_call, repeats)

  cost = jax.jit(lambda s, t: cost_matrix(neuron_descriptors(s),
                                          neuron_descriptors(t)))
  cost_s = median_seconds(lambda: cost(s, t), repeats)

  c_jax, eps = cost(s, t), res.epsilon
  _, ott_iters = _ott_default(c_jax, eps)
  ott_s = median_seconds(lambda: _ott_default(c_jax, eps), repeats)

  # Peak scratch memory of the compiled value-and-gradient (XLA's own count).
  memory = grad.lower(s, t, None).compile().memory_analysis()
  row = {"temp_mb": memory.temp_size_in_bytes / 2**20, "ot_ms": 1e3 * ot_s, "warm_ms": 1e3 * warm_s, "cost_ms": 1e3 * cost_s,
         "iters": int(res.n_iters),
         "warm_iters": float(np.median(jax.device_get(state["iters"]))),
         "warm_over_cost": warm_s / cost_s, "ott_ms": 1e3 * ott_s,
         "ott_iters": int(ott_iters), "speedup_vs_ott": ott_s / ot_s}
  pot = _pot()
  if pot is not None and max(s.shape[-1], t.shape[-1]) <= pot_max_neurons:
    c = np.asarray(cost(s, t), np.float64)
    a = np.full(c.shape[0], 1 / c.shape[0])
    b = np.full(c.shape[1], 1 / c.shape[1])
    eps = float(res.epsilon)
    exact = pot.emd2(a, b, c, numItermax=10_000_000)
    row["err_pct"] = 100 * (float(value) - exact) / exact
    pot_reps = max(3, repeats // 4) if c.size > 1024 ** 2 else repeats
    row["pot_emd_ms"] = 1e3 * median_seconds(
        lambda: pot.emd2(a, b, c, numItermax=10_000_000), pot_reps)
    row["pot_sinkhorn_ms"] = 1e3 * median_seconds(
        lambda: pot.sinkhorn2(a, b, c, eps, method="sinkhorn_log",
                              stopThr=options.get("threshold", 1e-3),
                              numItermax=10_000), pot_reps)
    row["speedup_vs_sinkhorn"] = row["pot_sinkhorn_ms"] / row["ot_ms"]
    row["speedup_vs_emd"] = row["pot_emd_ms"] / row["ot_ms"]
  return row


COLUMNS = ("n_s", "n_t", "ot_ms", "iters", "err_pct", "ott_ms", "ott_iters",
           "speedup_vs_ott", "pot_sinkhorn_ms",
           "pot_emd_ms", "speedup_vs_sinkhorn", "speedup_vs_emd", "cost_ms",
           "warm_ms", "warm_iters", "warm_over_cost", "temp_mb")


def bench_widths(neurons: Sequence[int], batch: int, repeats: int,
                 pot_max_neurons: int, options: dict,
                 deadline: Optional[float] = None) -> list:
  """Rows for n:n and n:n/2 at each width of ``neurons``; a pair not started
  before ``deadline`` (``time.monotonic()``) is recorded as skipped."""
  rng = np.random.default_rng(0)
  rows = []
  for n in neurons:
    for n_t in (n, n // 2):
      student, teacher = relu_activations(rng, batch, (n, n_t))
      row = {"n_s": n, "n_t": n_t}
      if deadline is not None and time.monotonic() > deadline:
        rows.append({**row, "skipped": "time budget"})
        continue
      row.update(bench_pair(student, teacher, repeats, pot_max_neurons,
                            options))
      rows.append(row)
      print({k: round(v, 3) if isinstance(v, float) else v
             for k, v in row.items()}, flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--neurons", default="64,256,512,1024,2048,4096")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--pot-max-neurons", type=int, default=2048,
                      help="POT references only up to this width (slow).")
  parser.add_argument("--relative-epsilon", type=float, default=0.005,
                      help="epsilon / mean cost (0.005: within 1%% of exact "
                      "OT; the library default 0.01 is within ~1-2%%).")
  parser.add_argument("--out", default="benchmarks_out")
  args = parser.parse_args(argv)
  options = {"relative_epsilon": args.relative_epsilon}
  rows = bench_widths([int(x) for x in args.neurons.split(",")], args.batch,
                      args.repeats, args.pot_max_neurons, options)
  table = write(args.out, "ot_solver", rows, COLUMNS,
                {"batch": args.batch, "repeats": args.repeats, **options})
  print(table)


if __name__ == "__main__":
  main()
