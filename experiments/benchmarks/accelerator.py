"""Accelerator benchmark: the OT solve and the training step, one command.

  python -m experiments.benchmarks.accelerator --out benchmarks_out
      [--budget-s 420] [--tiny]

Meant for one GPU/TPU (under 8 minutes); runs on whatever
``jax.devices()[0]`` is. The OT table needs only the core install and this
checkout (POT, when installed, adds the exact-OT reference); the train-step
table builds experiment configs, so it needs the experiments extra (without
it, that table is one row saying so). Two tables:

1. OT solver (``ot_solver.bench_widths``): dense ReLU layers, batch 64, n:n
   and n:n/2 for n = 64 ... 4096; Omega_P value + gradient from a cold start
   (``ot_ms``) and warm-started inside a training loop (``warm_ms``), each
   against the cost-matrix GEMM alone (``cold_over_cost``,
   ``warm_over_cost``).
2. Train step (``train_step.bench_model``): resnet56 at 32x32 and resnet50 at
   224x224 (native sizes), batch 64; task only, + Omega_I, + Omega_P on the
   last stage and on the last 3 stages: images/s and overhead over task only.

Writes ``OUT/accelerator.json`` (the device name, machine, settings, rows)
and ``OUT/accelerator.md``. The OT table may use the first 40 % of
``--budget-s``, the train steps the rest: work not started in time is
recorded as skipped, so the run ends in time whatever the device.
``--tiny`` runs both tables at toy sizes in seconds on a CPU (the test suite).
"""

import argparse
import importlib
import json
import os
import time

import jax

from experiments.benchmarks import ot_solver
from experiments.benchmarks.common import machine, markdown_table

VARIANTS = ("task only", "+ Omega_I (1 layer)", "+ Omega_I (3 layers)",
            "+ Omega_P (1 layer)", "+ Omega_P (3 layers)")

FULL = {"neurons": (64, 256, 512, 1024, 2048, 4096), "batch": 64,
        "ot_repeats": 20, "pot_max_neurons": 256,
        "models": ("resnet56", "resnet50"), "train_batch": 64,
        "train_repeats": 10, "variants": VARIANTS}
# Two variants only: each one is a compilation, the bulk of a CPU run.
TINY = {"neurons": (16,), "batch": 8, "ot_repeats": 2, "pot_max_neurons": 16,
        "models": ("digits_cnn",), "train_batch": 8, "train_repeats": 1,
        "variants": ("task only", "+ Omega_P (3 layers)")}
OT_COLUMNS = ("n_s", "n_t", "ot_ms", "iters", "cost_ms", "cold_over_cost",
              "warm_ms", "warm_iters", "warm_over_cost", "err_pct",
              "pot_emd_ms", "temp_mb", "skipped")
TRAIN_COLUMNS = ("model", "variant", "step_ms", "images_per_s",
                 "overhead_pct", "skipped")
# Omega_P's relative epsilon here, as in ot_solver: within 1 % of exact OT.
RELATIVE_EPSILON = 0.005


def run(settings: dict, budget_s: float) -> dict:
  """Both tables on ``jax.devices()[0]``; returns the JSON-able result."""
  start = time.monotonic()
  ot_rows = ot_solver.bench_widths(
      settings["neurons"], settings["batch"], settings["ot_repeats"],
      settings["pot_max_neurons"], {"relative_epsilon": RELATIVE_EPSILON},
      deadline=start + 0.4 * budget_s)
  for row in ot_rows:
    if "ot_ms" in row:
      row["cold_over_cost"] = row["ot_ms"] / row["cost_ms"]
  ot_seconds = time.monotonic() - start
  train_rows = []
  try:  # Builds experiment configs: needs the experiments extra (tfds, grain).
    train_step = importlib.import_module("experiments.benchmarks.train_step")
  except ImportError as err:  # Still write the OT table.
    train_step = None
    train_rows.append({"skipped": f"the train-step benchmark needs the "
                       f"experiments extra ({err.name} is missing)"})
  for model_name in settings["models"] if train_step else ():
    train_rows += train_step.bench_model(
        model_name, settings["train_batch"], settings["train_repeats"],
        settings["variants"], deadline=start + budget_s)
  return {
      "device": jax.devices()[0].device_kind,
      "machine": machine(),
      "settings": {**settings, "relative_epsilon": RELATIVE_EPSILON,
                   "budget_s": budget_s},
      "seconds": {"ot_solver": ot_seconds,
                  "train_step": time.monotonic() - start - ot_seconds},
      "ot_solver": {"rows": ot_rows},
      "train_step": {"rows": train_rows},
  }


def markdown(result: dict) -> str:
  m, s = result["machine"], result["settings"]
  skipped = sum("skipped" in r for r in result["ot_solver"]["rows"] +
                result["train_step"]["rows"])
  return "\n".join([
      f"# Accelerator benchmark: {result['device']}",
      "",
      f"jax {m['jax']} ({m['backend']}), {len(m['devices'])} device(s); "
      f"{result['seconds']['ot_solver']:.0f} s + "
      f"{result['seconds']['train_step']:.0f} s"
      + (f"; {skipped} rows skipped (time budget {s['budget_s']:.0f} s)"
         if skipped else "") + ".",
      "",
      f"## OT solver: Omega_P value + gradient, batch {s['batch']}, "
      f"epsilon = {s['relative_epsilon']} x mean cost, median of "
      f"{s['ot_repeats']} (ms)",
      "",
      markdown_table(result["ot_solver"]["rows"], OT_COLUMNS),
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
  parser.add_argument("--budget-s", type=float, default=420.0,
                      help="seconds of benchmarking after which the rows "
                      "not yet started are skipped (default 420: the whole "
                      "run, compilation included, stays under 8 minutes).")
  parser.add_argument("--tiny", action="store_true",
                      help="toy sizes: seconds on a CPU (for the tests).")
  args = parser.parse_args(argv)
  if args.budget_s < 0:
    parser.error(f"--budget-s must be >= 0, got {args.budget_s}.")
  result = run(TINY if args.tiny else FULL, args.budget_s)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "accelerator.json"), "w") as f:
    json.dump(result, f, indent=2)
  text = markdown(result)
  with open(os.path.join(args.out, "accelerator.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
