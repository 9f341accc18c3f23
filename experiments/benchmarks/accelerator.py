"""Accelerator benchmark: the OT solve, the training step and a run's cost, one command.

  python -m experiments.benchmarks.accelerator --out benchmarks_out
      [--budget-s 200] [--fashion-mnist-dir DIR] [--solvers auto] [--tiny]

Meant for one GPU/TPU (about 5 minutes); runs on whatever
``jax.devices()[0]`` is. The OT table needs only the core install and this
checkout (POT, when installed, adds the exact-OT reference); the train-step
and training-cost tables build experiment configs, so they need the
experiments extra (without it, each is one row saying so). Three tables:

1. OT solver (``ot_solver.bench_widths``): dense ReLU layers, batch 64, n:n
   and n:n/2 for n = 64 ... 4096; Omega_P value + gradient from a cold start
   (``ot_ms``) and warm-started inside a training loop (``warm_ms``), each
   against the cost-matrix GEMM alone (``cold_over_cost``,
   ``warm_over_cost``).
2. Train step (``train_step.bench_model``): resnet56 at 32x32 and resnet50 at
   224x224 (native sizes), batch 64; task only, + Omega_I, + Omega_P on the
   last stage and on the last 3 stages: images/s and overhead over task only.
3. Training cost (``train_cost.bench_setting``): the digits transfer run and,
   when the Fashion-MNIST IDX files are found (``--fashion-mnist-dir``), the
   Fashion-MNIST transfer and distillation runs, trained task only,
   + Omega_I / + FitNets and + Omega_P (once per ``--solvers`` entry, e.g.
   ``per_layer,batched``; default ``auto``: the batched solver on an
   accelerator), interleaved, evaluation off: median, mean and p90 step
   time, Omega_P over the reference, Sinkhorn iterations per step. Teachers
   are trained first, in ``--workdir`` (default: a temporary directory), not
   timed.

Writes ``OUT/accelerator.json`` (the device name, machine, settings, rows),
``OUT/accelerator.md``, and the training-cost table alone as
``OUT/train_cost.json`` / ``.md``. Work not started within its share of
``--budget-s`` (OT solver: the first 20 %; training cost: settings started
before 65 %; train steps: the rest) is recorded as skipped, so the run ends
in time whatever the device. ``--tiny`` runs every table at toy sizes in
seconds on a CPU (the test suite).
"""

import argparse
import importlib
import json
import os
import tempfile
import time
from typing import Optional

import jax

from experiments.benchmarks import ot_solver
from ot_transfer_jax.batched_sinkhorn import SOLVERS
from experiments.benchmarks.common import (TRAIN_COST_COLUMNS, machine,
                                           markdown_table)

VARIANTS = ("task only", "+ Omega_I (1 layer)", "+ Omega_I (3 layers)",
            "+ Omega_P (1 layer)", "+ Omega_P (3 layers)")

FULL = {"neurons": (64, 256, 512, 1024, 2048, 4096), "batch": 64,
        "ot_repeats": 20, "pot_max_neurons": 256,
        "models": ("resnet56", "resnet50"), "train_batch": 64,
        "train_repeats": 10, "variants": VARIANTS,
        "cost_settings": ("digits_transfer", "fashion_mnist_transfer",
                          "fashion_mnist_distill")}
# Two variants only: each one is a compilation, the bulk of a CPU run.
TINY = {"neurons": (16,), "batch": 8, "ot_repeats": 2, "pot_max_neurons": 16,
        "models": ("digits_cnn",), "train_batch": 8, "train_repeats": 1,
        "variants": ("task only", "+ Omega_P (3 layers)"),
        "cost_settings": ("digits_transfer",)}
OT_COLUMNS = ("n_s", "n_t", "ot_ms", "iters", "ott_ms", "ott_iters",
              "cost_ms", "cold_over_cost",
              "warm_ms", "warm_iters", "warm_over_cost", "err_pct",
              "pot_emd_ms", "temp_mb", "skipped")
TRAIN_COLUMNS = ("model", "variant", "step_ms", "images_per_s",
                 "overhead_pct", "skipped")
# Omega_P's relative epsilon here, as in ot_solver: within 1 % of exact OT.
RELATIVE_EPSILON = 0.005


def _experiments_module(name: str, what: str, rows: list):
  """``experiments.benchmarks.<name>``, or None with a row saying why: it
  builds experiment configs, so it needs the experiments extra (tfds,
  grain); without it the other tables are still written."""
  try:
    return importlib.import_module(f"experiments.benchmarks.{name}")
  except ImportError as err:
    rows.append({"skipped": f"the {what} benchmark needs the experiments "
                 f"extra ({err.name} is missing)"})
    return None


def run(settings: dict, budget_s: float, tiny: bool = False,
        fashion_mnist_dir: Optional[str] = None,
        workdir: Optional[str] = None, solvers=("auto",)) -> dict:
  """The three tables on ``jax.devices()[0]``; returns the JSON-able result."""
  start = time.monotonic()
  seconds = {}
  ot_rows = ot_solver.bench_widths(
      settings["neurons"], settings["batch"], settings["ot_repeats"],
      settings["pot_max_neurons"], {"relative_epsilon": RELATIVE_EPSILON},
      deadline=start + 0.2 * budget_s)
  for row in ot_rows:
    if "ot_ms" in row:
      row["cold_over_cost"] = row["ot_ms"] / row["cost_ms"]
  seconds["ot_solver"] = time.monotonic() - start

  cost_rows = []
  train_cost = _experiments_module("train_cost", "training-cost", cost_rows)
  cost = {"rows": cost_rows}
  if train_cost:
    cost = train_cost.run(settings["cost_settings"], tiny, fashion_mnist_dir,
                          workdir or tempfile.mkdtemp(prefix="train_cost_"),
                          deadline=start + 0.65 * budget_s, solvers=solvers)
  seconds["train_cost"] = time.monotonic() - start - sum(seconds.values())

  train_rows = []
  train_step = _experiments_module("train_step", "train-step", train_rows)
  for model_name in settings["models"] if train_step else ():
    train_rows += train_step.bench_model(
        model_name, settings["train_batch"], settings["train_repeats"],
        settings["variants"], deadline=start + budget_s)
  seconds["train_step"] = time.monotonic() - start - sum(seconds.values())
  return {
      "device": jax.devices()[0].device_kind,
      "machine": machine(),
      "settings": {**settings, "relative_epsilon": RELATIVE_EPSILON,
                   "budget_s": budget_s},
      "seconds": seconds,
      "ot_solver": {"rows": ot_rows},
      "train_cost": cost,
      "train_step": {"rows": train_rows},
  }


def markdown(result: dict) -> str:
  m, s = result["machine"], result["settings"]
  skipped = sum("skipped" in r for r in result["ot_solver"]["rows"] +
                result["train_cost"]["rows"] + result["train_step"]["rows"])
  seconds = result["seconds"]
  return "\n".join([
      f"# Accelerator benchmark: {result['device']}",
      "",
      f"jax {m['jax']} ({m['backend']}), {len(m['devices'])} device(s); "
      f"{seconds['ot_solver']:.0f} s + {seconds['train_cost']:.0f} s + "
      f"{seconds['train_step']:.0f} s"
      + (f"; {skipped} rows skipped (time budget {s['budget_s']:.0f} s)"
         if skipped else "") + ".",
      "",
      f"## OT solver: Omega_P value + gradient, batch {s['batch']}, "
      f"epsilon = {s['relative_epsilon']} x mean cost, median of "
      f"{s['ot_repeats']} (ms)",
      "",
      markdown_table(result["ot_solver"]["rows"], OT_COLUMNS),
      "",
      "## Training cost: real runs, evaluation off, variants interleaved "
      "(step times in ms: median, mean, p90)",
      "",
      markdown_table(result["train_cost"]["rows"], TRAIN_COST_COLUMNS),
      "",
      f"## Train step: batch {s['train_batch']}, median of "
      f"{s['train_repeats']}",
      "",
      markdown_table(result["train_step"]["rows"], TRAIN_COLUMNS),
      "",
  ])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks_out")
  parser.add_argument("--budget-s", type=float, default=200.0,
                      help="seconds of benchmarking after which the rows "
                      "not yet started are skipped (default 200: the whole "
                      "run, compilation included, takes about 5 minutes).")
  parser.add_argument("--fashion-mnist-dir", default=None,
                      help="the four Fashion-MNIST IDX files, for the "
                      "Fashion-MNIST training-cost rows (default: "
                      "/usr/share/datasets/fashion-mnist; without them those "
                      "rows are skipped).")
  parser.add_argument("--workdir", default=None,
                      help="where the training-cost teachers are trained "
                      "(default: a new temporary directory).")
  parser.add_argument("--solvers", default="auto",
                      help="the training-cost table's Omega_P solvers, "
                      f"comma-separated of {SOLVERS} (one row each; default "
                      "auto).")
  parser.add_argument("--tiny", action="store_true",
                      help="toy sizes: seconds on a CPU (for the tests).")
  args = parser.parse_args(argv)
  if args.budget_s < 0:
    parser.error(f"--budget-s must be >= 0, got {args.budget_s}.")
  solvers = args.solvers.split(",")
  if sorted(set(solvers) - set(SOLVERS)):
    parser.error(f"unknown solver(s) in --solvers {args.solvers!r}; choose "
                 f"from {SOLVERS}.")
  result = run(TINY if args.tiny else FULL, args.budget_s, args.tiny,
               args.fashion_mnist_dir, args.workdir, solvers)
  os.makedirs(args.out, exist_ok=True)
  if "machine" in result["train_cost"]:  # The table alone, as train_cost's.
    importlib.import_module("experiments.benchmarks.train_cost").write(
        result["train_cost"], args.out)
  with open(os.path.join(args.out, "accelerator.json"), "w") as f:
    json.dump(result, f, indent=2)
  text = markdown(result)
  with open(os.path.join(args.out, "accelerator.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
