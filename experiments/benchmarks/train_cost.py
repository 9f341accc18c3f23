"""What a training run pays per step for Omega_P, against Omega_I / FitNets.

  python -m experiments.benchmarks.train_cost [--settings digits_transfer,...]
      [--solvers auto|per_layer,batched] [--fashion-mnist-dir DIR]
      [--workdir /tmp/train_cost] [--out docs/benchmarks] [--tiny]

For each setting (an experiment config of ``experiments/configs``), the real
run of its Omega_P method -- data, teacher, initialisation, schedule -- is
trained with evaluation off in these variants:

* ``task only``: the Omega_P config with its loss terms removed;
* ``+ Omega_I`` (transfer configs) or ``+ FitNets`` (distillation, where the
  widths differ): the config's own method of that name;
* ``+ Omega_P``: the config's ``ot`` method, once per ``--solvers`` entry
  (the Omega_P option ``solver``: ``auto``, the default, picks by backend;
  ``--solvers per_layer,batched`` times both, as ``+ Omega_P (per_layer)``
  and ``+ Omega_P (batched)``);
* ``Omega_P floor``: the first of those with at most 2 Sinkhorn iterations
  per layer-step (``max_iterations=2``, ``block=2``, unconverged): what Omega_P's
  step costs besides its iterations, i.e. the most that fewer iterations
  could save.

The variants' steps are interleaved (A B C A B C ...), so that a change of
the machine's load hits all of them alike. Each step is compiled ahead of
time and timed from dispatch to completion (the next batch is on the device
before the clock starts). Reported per variant: the median, mean and 90th
percentile step time over the run (``step_ms``, ``mean_ms``, ``p90_ms``; a
run pays the mean), the median's ratio to the task-only step
(``over_task``) and, for Omega_P, to the reference (``over_ref``: Omega_I, or
FitNets; ``over_ref_mean``: the ratio of means); the Sinkhorn iterations per
step, all layers together (``step_iters_median``, ``step_iters_mean``,
``step_iters_p90``) and per layer-step (``iters_median``, ``iters_p90``,
``iters_max``), from the logged ``sinkhorn_iters`` metric, with the share of
layer-steps that did not reach the threshold (``unconverged_pct``). (The
batched solver's loop runs as long as its slowest layer: its iterations per
step summed over layers count each layer's own.)

Teachers are trained once (the config's teacher job) and cached in
``WORKDIR/<setting>/teacher``. The Fashion-MNIST settings need the four IDX
files (``--fashion-mnist-dir``, default the Debian package's directory);
without them they are recorded as skipped and the digits setting still runs.
``--tiny`` trains a few steps of digits only, in seconds (the test suite).

Writes ``OUT/train_cost.json`` and ``OUT/train_cost.md``.
"""

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import time
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from experiments import job as job_lib
from experiments import loop
from experiments.benchmarks.common import (TRAIN_COST_COLUMNS, machine,
                                           markdown_table)
from ot_transfer_jax import batched_sinkhorn, parallel
from experiments.data import idx

# setting -> (reference variant's method, its label); Omega_P is "ot".
SETTINGS = {
    "digits_transfer": ("feature_matching", "+ Omega_I"),
    "fashion_mnist_transfer": ("feature_matching", "+ Omega_I"),
    "fashion_mnist_distill": ("fitnets", "+ FitNets"),
}
# setting -> its config: experiments/configs/<file>.py:data=<data>.
CONFIGS = {"digits_transfer": ("transfer", "digits"),
           "fashion_mnist_transfer": ("transfer", "fashion_mnist"),
           "fashion_mnist_distill": ("distill", "fashion_mnist")}
TASK, OMEGA_P, FLOOR = "task only", "+ Omega_P", "Omega_P floor"
FLOOR_ITERATIONS = 2  # A warm start checks convergence every 2 iterations.
SOLVERS = batched_sinkhorn.SOLVERS  # The Omega_P option ``solver``.
# --tiny: student and teacher steps (compilation is most of a tiny run).
TINY_STEPS = 4


@dataclasses.dataclass
class Variant:
  """One variant being trained: its job, current state and what it measured."""

  label: str
  job: job_lib.Job
  step: object  # The compiled train step.
  state: object
  batches: object
  seconds: list = dataclasses.field(default_factory=list)
  iters: list = dataclasses.field(default_factory=list)  # Per layer-step.
  step_iters: list = dataclasses.field(default_factory=list)  # Per step.
  unconverged: list = dataclasses.field(default_factory=list)


def omega_p_label(solver: str, solvers: Sequence[str]) -> str:
  """``+ Omega_P``, or ``+ Omega_P (solver)`` when several are timed."""
  return OMEGA_P if len(solvers) == 1 else f"{OMEGA_P} ({solver})"


def variant_configs(setting: str, tiny: bool = False,
                    data_dir: Optional[str] = None,
                    workdir: str = "/tmp/train_cost",
                    solvers: Sequence[str] = ("auto",)) -> dict:
  """``{label: config}`` of a setting's variants (evaluation off): task
  only, the reference, Omega_P per solver, the floor."""
  unknown = sorted(set(solvers) - set(SOLVERS))
  if unknown or not solvers:
    raise ValueError(f"solvers={tuple(solvers)}: choose one or more of "
                     f"{SOLVERS}.")
  file, data = CONFIGS[setting]
  module = importlib.import_module(f"experiments.configs.{file}")
  ref_method, ref_label = SETTINGS[setting]
  variants = [(TASK, "ot", None), (ref_label, ref_method, None)]
  variants += [(omega_p_label(s, solvers), "ot", s) for s in solvers]
  variants.append((FLOOR, "ot", solvers[0]))
  configs = {}
  for label, method, solver in variants:
    c = module.get_config(f"data={data},method={method}")
    with c.unlocked():
      if label == TASK:
        c.loss.terms = ml_collections.ConfigDict()
      if solver is not None:
        c.loss.terms.ot.options.solver = solver
      if label == FLOOR:
        c.loss.terms.ot.options.max_iterations = FLOOR_ITERATIONS
        c.loss.terms.ot.options.block = FLOOR_ITERATIONS
      c.eval_every = 0
      c.teacher.workdir = os.path.join(workdir, setting, "teacher")
      if data_dir:
        c.data.data_dir = c.teacher.job.data.data_dir = data_dir
      if tiny:  # An untrained teacher: no teacher job to run.
        c.num_steps = TINY_STEPS
        c.teacher.source = "random"
        c.teacher.num_classes = len(c.teacher.job.data.classes or range(10))
        c.teacher.image_shape = (8, 8, 1)
        # No statistics of its own: the student's (timing is the same).
        c.teacher_normalization = False
    configs[label] = c
  return configs


def _start(label: str, config, workdir: str) -> Variant:
  """Sets the run up (training the teacher if not cached) and compiles its
  step ahead of time, so that no timed step compiles."""
  job = job_lib.setup(config, workdir, loop.ensure_teacher(config, workdir))
  sample = parallel.shard_batch(next(job.train_batches(start_step=0)),
                                job.mesh)
  step = job.train_step.lower(job.initial_state, job.teacher_vars,
                              sample).compile()
  return Variant(label, job, step, job.initial_state,
                 job.train_batches(start_step=0))


def _take_step(v: Variant) -> None:
  batch = jax.block_until_ready(parallel.shard_batch(next(v.batches),
                                                     v.job.mesh))
  start = time.perf_counter()
  v.state, metrics = v.step(v.state, v.job.teacher_vars, batch)
  jax.block_until_ready((v.state, metrics))
  v.seconds.append(time.perf_counter() - start)
  metrics = jax.device_get(metrics)
  iters = [int(x) for k, x in metrics.items()
           if k.startswith("sinkhorn_iters/")]
  v.iters += iters
  if iters:
    v.step_iters.append(sum(iters))
  v.unconverged += [1.0 - float(x) for k, x in metrics.items()
                    if k.startswith("sinkhorn_converged/")]


def _row(setting: str, v: Variant) -> dict:
  row = {"setting": setting, "variant": v.label, "steps": len(v.seconds),
         "step_ms": 1e3 * statistics.median(v.seconds),
         "mean_ms": 1e3 * statistics.fmean(v.seconds),
         "p90_ms": 1e3 * float(np.percentile(v.seconds, 90))}
  if v.iters:
    iters, per_step = np.asarray(v.iters), np.asarray(v.step_iters)
    row.update(step_iters_median=float(np.median(per_step)),
               step_iters_mean=float(per_step.mean()),
               step_iters_p90=float(np.percentile(per_step, 90)),
               iters_median=float(np.median(iters)),
               iters_p90=float(np.percentile(iters, 90)),
               iters_max=int(iters.max()),
               unconverged_pct=100 * float(np.mean(v.unconverged)))
  return row


def bench_setting(setting: str, tiny: bool = False,
                  data_dir: Optional[str] = None,
                  workdir: str = "/tmp/train_cost",
                  deadline: Optional[float] = None,
                  solvers: Sequence[str] = ("auto",)) -> list:
  """The setting's rows (see the module docstring); one skipped row when its
  data is missing or ``deadline`` (``time.monotonic()``) passed."""
  configs = variant_configs(setting, tiny, data_dir, workdir, solvers)
  first = next(iter(configs.values()))
  if first.data.name == "fashion_mnist":
    try:
      idx.resolve_dir("fashion_mnist", first.data.data_dir or None)
    except FileNotFoundError:
      where = first.data.data_dir or idx.IDX_DATASETS["fashion_mnist"].default_dir
      return [{"setting": setting,
               "skipped": f"no data: the Fashion-MNIST IDX files are not in "
                          f"{where} (see --fashion-mnist-dir)"}]
  if deadline is not None and time.monotonic() > deadline:
    return [{"setting": setting, "skipped": "time budget"}]
  variants = [_start(label, c, os.path.join(workdir, setting, str(i)))
              for i, (label, c) in enumerate(configs.items())]
  for _ in range(first.num_steps):
    for v in variants:  # Interleaved: A B C A B C ...
      _take_step(v)
  rows = [_row(setting, v) for v in variants]
  task, ref = rows[:2]
  for row in rows:
    row["over_task"] = row["step_ms"] / task["step_ms"]
  for row in rows[2:]:
    row["over_ref"] = row["step_ms"] / ref["step_ms"]
    row["over_ref_mean"] = row["mean_ms"] / ref["mean_ms"]
  for row in rows:
    print({k: round(x, 3) if isinstance(x, float) else x
           for k, x in row.items()}, flush=True)
  return rows


def run(settings: Sequence[str], tiny: bool = False,
        data_dir: Optional[str] = None, workdir: str = "/tmp/train_cost",
        deadline: Optional[float] = None,
        solvers: Sequence[str] = ("auto",)) -> dict:
  start = time.monotonic()
  rows = []
  for setting in settings:
    rows += bench_setting(setting, tiny, data_dir, workdir, deadline,
                          solvers)
  return {"machine": machine(), "load_average": os.getloadavg(),
          "settings": list(settings), "solvers": list(solvers),
          "tiny": tiny, "seconds": time.monotonic() - start, "rows": rows}


def markdown(result: dict) -> str:
  m = result["machine"]
  load = ", ".join(f"{x:.1f}" for x in result["load_average"])
  return "\n".join([
      f"Training cost per step, evaluation off, variants interleaved; "
      f"{m['devices'][0]} ({m['backend']}, {m['cpu_count']} CPUs, "
      f"jax {m['jax']}), load average at the end {load}; "
      f"{result['seconds']:.0f} s. Omega_P solver: "
      f"{', '.join(result.get('solvers', ['auto']))}.",
      "",
      markdown_table(result["rows"], TRAIN_COST_COLUMNS),
      ""])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--settings", default=None,
                      help=f"comma-separated, of {tuple(SETTINGS)} (default: "
                      "all; digits_transfer with --tiny).")
  parser.add_argument("--fashion-mnist-dir", default=None,
                      help="directory of the four Fashion-MNIST IDX files "
                      "(default: /usr/share/datasets/fashion-mnist).")
  parser.add_argument("--workdir", default="/tmp/train_cost",
                      help="where teachers are trained once and cached.")
  parser.add_argument("--out", default="benchmarks_out")
  parser.add_argument("--solvers", default="auto",
                      help=f"comma-separated, of {SOLVERS}: one '+ Omega_P' "
                      "variant per solver (the Omega_P option 'solver'; auto "
                      "picks by backend).")
  parser.add_argument("--tiny", action="store_true",
                      help=f"{TINY_STEPS} steps of everything: seconds on a "
                      "CPU (for the tests).")
  args = parser.parse_args(argv)
  settings = (args.settings.split(",") if args.settings else
              ["digits_transfer"] if args.tiny else list(SETTINGS))
  unknown = sorted(set(settings) - set(SETTINGS))
  if unknown:
    parser.error(f"unknown setting(s) {unknown}; choose from "
                 f"{tuple(SETTINGS)}.")
  solvers = args.solvers.split(",")
  if sorted(set(solvers) - set(SOLVERS)):
    parser.error(f"unknown solver(s) in --solvers {args.solvers!r}; choose "
                 f"from {SOLVERS}.")
  result = run(settings, args.tiny, args.fashion_mnist_dir, args.workdir,
               solvers=solvers)
  write(result, args.out)


def write(result: dict, out_dir: str) -> str:
  """``OUT/train_cost.json`` and ``.md``; returns the markdown."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "train_cost.json"), "w") as f:
    json.dump(result, f, indent=2)
  text = markdown(result)
  with open(os.path.join(out_dir, "train_cost.md"), "w") as f:
    f.write(text)
  print(text)
  return text


if __name__ == "__main__":
  main()
