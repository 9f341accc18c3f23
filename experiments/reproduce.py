"""Every method of a config x several seeds, then the table and the figures.

  python -m experiments.reproduce \
      --config experiments/configs/digits_transfer.py --seeds 3 \
      [--workdir workdirs/digits_transfer] [--methods ot,l2_sp] \
      [--config.num_steps=100 ...]

Runs ``experiments.main``'s job for each (method, seed) in
``WORKDIR/<method>/seed<k>`` (finished runs are reused, interrupted ones
resume), with ``config.seed = k`` and, unless ``config.vary_data_seed`` is
False, ``config.data.seed = k`` (a new data subsample and validation split per
seed): for a given seed every method sees the same data, batches and student
initialisation. Configs whose teacher trains on the student's training split
keep ``data.seed`` fixed, so that validation never holds teacher training
images. A teacher trained by the config is trained once, in
``WORKDIR/teacher``. Writes ``WORKDIR/results.json`` (one record per run:
``method``, ``seed``, ``status`` ("finished" or "diverged"),
``test_accuracy_best_val``, ``test_accuracy_last``, ``val_accuracy_best``,
``best_step``, ``step``, ``workdir``),
``WORKDIR/results.md`` and the figures, and prints the table.
"""

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.cli import (maybe_initialize_distributed, parse_flags,
                             quiet_orbax, user_errors)
from ot_transfer_jax import experiment, report

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiment config with `methods`.",
    lock_config=True)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method: 0 .. seeds-1.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Root directory (default: workdirs/<config name>).")
_METHODS = flags.DEFINE_list("methods", None,
                             "Subset of the config's methods (default: all).")
flags.mark_flags_as_required(["config"])


def run_all(config, root: str, seeds: int, methods=None) -> list:
  """Runs (or reuses) every method x seed; returns the result records."""
  methods = list(methods or config.get("method_order") or
                 config.methods.keys())
  unknown = sorted(set(methods) - set(config.methods.keys()))
  if unknown:
    raise ValueError(f"Unknown methods {unknown}; this config defines "
                     f"{sorted(config.methods.keys())}.")
  records, runs, analyses = [], {}, {}
  for method in methods:
    for seed in range(seeds):
      cfg = config.copy_and_resolve_references()
      with cfg.unlocked():
        cfg.method, cfg.seed = method, seed
        if cfg.get("vary_data_seed", True):
          cfg.data.seed = seed
        if cfg.teacher.source == "train" and not cfg.teacher.workdir:
          cfg.teacher.workdir = os.path.join(root, "teacher")
      workdir = os.path.join(root, method, f"seed{seed}")
      logging.info("=== %s, seed %d -> %s", method, seed, workdir)
      try:
        final = experiment.train_and_evaluate(cfg, workdir)
      except FloatingPointError as e:  # Diverged: recorded, never hidden.
        logging.error("%s seed %d diverged: %s", method, seed, e)
        records.append({"method": method, "seed": seed, "status": "diverged",
                        "test_accuracy_best_val": None,
                        "test_accuracy_last": None, "workdir": workdir})
        continue
      records.append({
          "method": method, "seed": seed, "status": "finished",
          "test_accuracy_best_val": final["test_accuracy_at_best_val"],
          "test_accuracy_last": final["test_accuracy"],
          "val_accuracy_best": final["best_val_accuracy"],
          "best_step": final["best_step"], "step": final["step"],
          "workdir": workdir,
      })
      runs.setdefault(method, []).append(workdir)
      if jax.process_index() == 0:  # Process 0 alone writes the outputs.
        with open(os.path.join(workdir, experiment.ANALYSIS)) as f:
          analyses.setdefault(method, []).append(json.load(f))
  if jax.process_index() != 0:
    return records, ""
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump(records, f, indent=2)
  finished = [r for r in records if r["status"] == "finished"]
  table = report.write_report(root, finished, runs, analyses,
                              methods_order=methods,
                              baseline=config.get("baseline_method") or None)
  diverged = [f"{r['method']} seed {r['seed']}" for r in records
              if r["status"] != "finished"]
  if diverged:
    note = ("\nDiverged (non-finite loss; left out of the means): "
            f"{', '.join(diverged)}.\n")
    with open(os.path.join(root, "results.md"), "a") as f:
      f.write(note)
    table += note
  return records, table


def main(argv):
  del argv
  maybe_initialize_distributed()
  quiet_orbax()
  with user_errors():
    _run()


def _run():
  config = _CONFIG.value
  root = _WORKDIR.value or os.path.join(
      "workdirs", os.path.splitext(os.path.basename(
          flags.FLAGS["config"].config_filename))[0])
  os.makedirs(root, exist_ok=True)
  _, table = run_all(config, root, _SEEDS.value, _METHODS.value)
  print(f"\nResults in {root} ({_SEEDS.value} seeds):\n")
  print(table)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
