"""Replays the Omega_P solves of a real training run, per layer and batched.

  python -m experiments.benchmarks.sinkhorn_replay record [--steps 40]
      [--out tests/data/digits_transfer_costs.npz] [--workdir /tmp/replay]
  python -m experiments.benchmarks.sinkhorn_replay replay
      [--costs tests/data/digits_transfer_costs.npz] [--blocks 2,4,8,16]

``record`` trains the digits transfer Omega_P run
(``experiments/configs/transfer.py:data=digits,method=ot``, its teacher
trained first and cached in ``--workdir``) for its first ``--steps`` steps (of
its 200-step schedule) and writes, per step and layer pair, the cost matrix
its Sinkhorn solve saw, in units of its mean (float16, as ``costs_<l>``,
``(steps, n_s, n_t)``), that mean (``units``, ``(steps, L)``: it carries the
warm start from step to step) and the iterations the run logged
(``logged_iters``, ``(steps, L)``). A few hundred KB: the test suite replays
it (``tests/test_batched_sinkhorn.py``).

``replay`` solves the recorded problems again, warm-started from step to step
as in training (step 0 from zero potentials), with today's per-layer solver
(ott-jax's ``Sinkhorn`` as :func:`ot_transfer_jax.ot.solve_neuron_ot`
configures a warm start, Anderson on and off) and with the batched loop of
:mod:`ot_transfer_jax.batched_sinkhorn` for each ``--blocks`` size, and
prints per solver: Sinkhorn iterations per step (all layers together; for
the batched loop also its trips per step), unconverged solves and the value's
largest relative difference to the per-layer solve. It counts iterations,
not time: timing is ``train_cost``'s job.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ot_transfer_jax import batched_sinkhorn, ot, regularizers

DEFAULT_COSTS = os.path.normpath(os.path.join(
    os.path.dirname(__file__), "..", "..", "tests", "data",
    "digits_transfer_costs.npz"))
RECORDER = f"{__name__}:RecordingOmegaP"


@dataclasses.dataclass(frozen=True)
class RecordingOmegaP(regularizers.OmegaP):
  """Omega_P that also returns the scaled cost matrix and its mean as
  metrics (``cost``, ``unit``): what ``record`` writes."""

  def apply(self, params, state, student, teacher):
    value, metrics, new_state = super().apply(params, state, student,
                                              teacher)
    describe = lambda x: ot.neuron_descriptors(
        x, spatial=self.spatial, normalize=self.normalize)
    sq_s, sq_t, cross, mean, d = ot._cost_terms(
        describe(student), describe(teacher), None, "highest")
    unit = jnp.maximum(mean, ot._TINY)
    metrics.update(cost=ot._assemble_cost(sq_s, sq_t, cross, d * unit),
                   unit=unit)
    return value, metrics, new_state

  def apply_pairs(self, params, states, students, teachers):
    return regularizers.Regularizer.apply_pairs(self, params, states,
                                                students, teachers)


def record(steps: int, out: str, workdir: str = "/tmp/replay") -> dict:
  """Trains the digits transfer Omega_P run for ``steps`` steps; writes and
  returns the arrays described in the module docstring."""
  from experiments import job as job_lib
  from experiments import loop
  from experiments.configs import transfer
  from ot_transfer_jax import parallel

  config = transfer.get_config("data=digits,method=ot")
  with config.unlocked():
    config.loss.terms.ot.regularizer = RECORDER
    config.loss.terms.ot.options.solver = "per_layer"
    config.eval_every = 0
    config.teacher.workdir = os.path.join(workdir, "teacher")
  job = job_lib.setup(config, os.path.join(workdir, "student"),
                      loop.ensure_teacher(config, workdir))
  keys = [regularizers.pair_key(s, t) for s, t, _ in
          regularizers.terms_from_config(config.loss.terms)[0].pairs]
  state, batches = job.initial_state, job.train_batches(start_step=0)
  costs, units, iters = [[] for _ in keys], [], []
  for _ in range(steps):
    batch = parallel.shard_batch(next(batches), job.mesh)
    state, metrics = job.train_step(state, job.teacher_vars, batch)
    metrics = jax.device_get(metrics)
    for l, key in enumerate(keys):
      costs[l].append(np.asarray(metrics[f"cost/ot/{key}"], np.float16))
    units.append([float(metrics[f"unit/ot/{k}"]) for k in keys])
    iters.append([int(metrics[f"sinkhorn_iters/ot/{k}"]) for k in keys])
  arrays = {f"costs_{l}": np.stack(c) for l, c in enumerate(costs)}
  arrays.update(units=np.asarray(units, np.float32),
                logged_iters=np.asarray(iters, np.int32),
                relative_epsilon=np.float32(
                    config.loss.terms.ot.options.relative_epsilon),
                pairs=np.asarray(keys))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez_compressed(out, **arrays)
  return arrays


def load(path: str = DEFAULT_COSTS) -> dict:
  """``{"costs": [L arrays (steps, n_s, n_t) float32], "units": (steps, L),
  "logged_iters": (steps, L), "relative_epsilon": float}``."""
  with np.load(path) as f:
    num = sum(k.startswith("costs_") for k in f.files)
    return {"costs": [f[f"costs_{l}"].astype(np.float32)
                      for l in range(num)],
            "units": f["units"], "logged_iters": f["logged_iters"],
            "relative_epsilon": float(f["relative_epsilon"])}


@dataclasses.dataclass
class Replay:
  """What one solver did on every step: ``(steps, L)`` arrays."""

  values: np.ndarray
  iters: np.ndarray
  converged: np.ndarray
  trips: Optional[np.ndarray] = None  # (steps,), batched only.


def _per_layer_solve(anderson: int, threshold: float, max_iterations: int):
  """ott-jax's Sinkhorn as ``solve_neuron_ot`` runs a warm start."""
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem

  solver = ot._solver(threshold, max_iterations, 2, 0, anderson, False)

  @jax.jit
  def solve(cost, eps, f, g):
    out = solver(linear_problem.LinearProblem(
        geometry.Geometry(cost_matrix=cost, epsilon=eps)), init=(f, g))
    return jnp.sum(out.matrix * cost), out.f, out.g, out.n_iters, \
        out.converged

  return solve


def replay(data: dict, solver: str = "per_layer", *, block: int = 8,
           anderson: int = ot.DEFAULT_ANDERSON_MEMORY,
           threshold: float = 1e-3, max_iterations: int = 2000) -> Replay:
  """The recorded problems solved again with ``solver`` (``"per_layer"``
  or ``"batched"``), warm-started from step to step as in training."""
  costs, units = data["costs"], data["units"]
  steps, num = units.shape
  eps = data["relative_epsilon"]
  shapes = [c.shape[1:] for c in costs]
  potentials = [(np.zeros(n_s, np.float32), np.zeros(n_t, np.float32))
                for n_s, n_t in shapes]
  values, iters, converged, trips = (np.zeros((steps, num)) for _ in range(4))
  if solver == "per_layer":
    solve = _per_layer_solve(anderson, threshold, max_iterations)
  else:
    solve = jax.jit(lambda c, f, g: batched_sinkhorn.sinkhorn(
        c, jnp.full((num,), eps, jnp.float32), shapes, init=(f, g),
        threshold=threshold, max_iterations=max_iterations, block=block))
  for s in range(steps):
    # Potentials carried in absolute units, as OmegaP's state.
    scale = units[s - 1] / units[s] if s else np.ones(num, np.float32)
    init = [(f * k, g * k) for (f, g), k in zip(potentials, scale)]
    step_costs = [jnp.asarray(c[s]) for c in costs]
    if solver == "per_layer":
      for l, (c, (f, g)) in enumerate(zip(step_costs, init)):
        v, f, g, n, ok = solve(c, eps, f, g)
        values[s, l], iters[s, l], converged[s, l] = v, n, ok
        potentials[l] = (np.asarray(f), np.asarray(g))
    else:
      n, m = max(x[0] for x in shapes), max(x[1] for x in shapes)
      out = solve(batched_sinkhorn.pad_stack(step_costs),
                  batched_sinkhorn.pad_vectors([jnp.asarray(f) for f, _ in
                                                 init], n),
                  batched_sinkhorn.pad_vectors([jnp.asarray(g) for _, g in
                                                 init], m))
      for l, (c, (n_s, n_t)) in enumerate(zip(step_costs, shapes)):
        f, g = out.f[l, :n_s], out.g[l, :n_t]
        plan = jnp.exp((f[:, None] + g[None, :] - c) / eps)
        values[s, l] = jnp.sum(plan * c)
        potentials[l] = (np.asarray(f), np.asarray(g))
      iters[s], converged[s] = out.n_iters, out.converged
      trips[s] = int(out.n_iters.max()) // block
  return Replay(values, iters.astype(int), converged.astype(bool),
                trips[:, 0].astype(int) if solver != "per_layer" else None)


def summary(result: Replay, reference: Optional[Replay] = None) -> dict:
  """Iterations per step (all layers): median, mean, p90, max; unconverged
  solves; the batched loop's trips per step; the largest relative value
  difference to ``reference``."""
  per_step = result.iters.sum(axis=1)
  row = {"iters_median": float(np.median(per_step)),
         "iters_mean": float(per_step.mean()),
         "iters_p90": float(np.percentile(per_step, 90)),
         "iters_max": int(per_step.max()),
         "unconverged": int((~result.converged).sum())}
  if result.trips is not None:
    row.update(loop_iters_mean=float(result.iters.max(axis=1).mean()),
               trips_mean=float(result.trips.mean()),
               trips_max=int(result.trips.max()))
  if reference is not None:
    row["max_value_diff_pct"] = 100 * float(np.max(np.abs(
        result.values / reference.values - 1)))
  return row


def main(argv: Optional[Sequence[str]] = None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("command", choices=("record", "replay"))
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--out", default=DEFAULT_COSTS)
  parser.add_argument("--workdir", default="/tmp/replay")
  parser.add_argument("--costs", default=DEFAULT_COSTS)
  parser.add_argument("--blocks", default="2,4,8,16")
  args = parser.parse_args(argv)
  if args.command == "record":
    arrays = record(args.steps, args.out, args.workdir)
    print(f"Wrote {args.out}: {args.steps} steps, pairs "
          f"{list(arrays['pairs'])}, logged iterations per layer-step "
          f"median {np.median(arrays['logged_iters']):.0f}, max "
          f"{arrays['logged_iters'].max()}.")
    return
  data = load(args.costs)
  reference = replay(data, "per_layer")
  rows = {"per_layer (Anderson 3)": summary(reference),
          "per_layer (no Anderson)": summary(replay(data, "per_layer",
                                                    anderson=0), reference)}
  for block in (int(b) for b in args.blocks.split(",")):
    rows[f"batched (block {block})"] = summary(
        replay(data, "batched", block=block), reference)
  for name, row in rows.items():
    print(f"{name}: {row}")


if __name__ == "__main__":
  main()
