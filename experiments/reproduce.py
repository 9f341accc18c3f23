"""Every method of a config x several seeds, then the table and the figures.

  python -m experiments.reproduce \
      --config experiments/configs/transfer.py:data=digits --seeds 3 \
      [--workdir workdirs/reproduce/digits_transfer] [--methods ot,l2_sp] \
      [--config.num_steps=100 ...]

Runs ``experiments.main``'s job for each (method, seed) in
``WORKDIR/<method>/seed<k>`` (finished runs are reused, interrupted ones
resume), with ``config.seed = k`` and, unless ``config.vary_data_seed`` is
False, ``config.data.seed = k`` (a new data subsample and validation split per
seed): for a given seed every method sees the same data, batches and student
initialisation. Configs whose teacher trains on the student's training split
keep ``data.seed`` fixed, so that validation never holds teacher training
images. A teacher trained by the config is trained once, in
``WORKDIR/teacher``. A run left to train whose student would start from its
teacher's initial weights (from random weights, the teacher's architecture
and seed: :func:`experiments.runs.check_initialisation`) stops the command
before any run; a finished run is reused, never refused. Writes
``WORKDIR/results.json`` (one
:class:`experiments.runs.Record` per run, without its config: ``method``,
``seed``, ``hyperparameters`` (each loss term's weight, weight and head
decay, by config key), ``workdir``, ``status`` ("finished" or "diverged"),
``test_accuracy_best_val``, ``test_accuracy_last``, ``val_accuracy_best``,
``best_step``, ``step``, the plan diagnostics ``matched_fraction``,
``row_max_mass``, ``plan_entropy`` per layer and ``wall_s``),
``WORKDIR/results.md`` and the figures, and prints the table.

Each method's config is ``get_config(method)`` of the config file, with the
other settings of ``file.py:ARG`` kept (``transfer.py:data=fashion_mnist``
gives ``get_config("data=fashion_mnist,method=<method>")``); the command
line's ``--config.key=value`` overrides are checked against the config
``--config`` names (its default method, or the one ARG names) and applied,
last, to every method whose config has the key. The default WORKDIR is
``workdirs/reproduce/<name>``, ``name`` being the file's, prefixed by ARG's
values other than the method: ``workdirs/reproduce/fashion_mnist_transfer``
for ``transfer.py:data=fashion_mnist`` (:func:`cli.default_root`; main, sweep
and curve have their own, so no tool writes into another's runs).
"""

from experiments import interrupts

if __name__ == "__main__":  # A command (not an import): from its first line,
  interrupts.install()  # Ctrl-C / SIGTERM end in one line (imports included).

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import loop, report, runs
from experiments.cli import (default_root, maybe_initialize_distributed,
                             parse_flags, quiet_libraries, user_errors)
from experiments.configs import common


def define_flags() -> None:
  """This tool's flags, defined when it runs (``python -m``): reproduce,
  sweep and curve each define their own, so that they import together."""
  config_flags.DEFINE_config_file(
      "config", None, "Path to an experiment config with methods.",
      lock_config=True)
  flags.DEFINE_integer("seeds", 3, "Seeds per method: 0 .. seeds-1.")
  flags.DEFINE_string(
      "workdir", None, "Root directory (default: workdirs/reproduce/<config "
      "name>).")
  flags.DEFINE_list("methods", None,
                    "Subset of the config's methods (default: all).")
  flags.mark_flags_as_required(["config"])


def run_workdir(root: str, method: str, seed: int) -> str:
  """Where ``method``'s run of ``seed`` trains: ``ROOT/<method>/seed<k>``."""
  return os.path.join(root, method, f"seed{seed}")


def check_initialisations(configs: dict, root: str, seeds: int) -> None:
  """Refuses, before any run, a student that would start from its teacher's
  initial weights (:func:`experiments.runs.check_initialisation`) on a seed
  left to train; a seed whose workdir holds a finished run (its
  ``final_metrics.json``) is reused, not trained, so never refused.

  Args:
    configs: ``{method: config}``; seeds: the table's seeds are
      ``0 .. seeds-1``.

  Raises:
    ValueError: naming the method, the seed and the fix.
  """
  for method, config in configs.items():
    left = [s for s in range(seeds)
            if not loop.is_finished(run_workdir(root, method, s))]
    runs.check_initialisation(config, left, method)


def run_all(configs: dict, root: str, seeds: int, baseline=None) -> tuple:
  """Runs (or reuses) every method x seed; returns the records and the table.

  Args:
    configs: ``{method: config}`` in the order of the results; the table
      pairs every method with ``baseline``, then Omega_P with the others
      (``common.contrasts``).

  Returns:
    ``(records, table)``: one :class:`experiments.runs.Record` per run, without
    its config (as in ``results.json``), and the Markdown table ("" on
    processes other than 0, which write nothing).

  Raises:
    ValueError: before any run, a run left to train that would start from
      its teacher's initial weights (:func:`check_initialisations`).
  """
  check_initialisations(configs, root, seeds)
  os.makedirs(root, exist_ok=True)
  records, workdirs, analyses = [], {}, {}
  for method, config in configs.items():
    for seed in range(seeds):
      cfg = runs.seeded(config, seed, root)
      workdir = run_workdir(root, method, seed)
      logging.info("=== %s, seed %d -> %s", method, seed, workdir)
      record = runs.run_record(
          cfg, workdir, method=method, seed=seed,
          hyperparameters=runs.hyperparameters(cfg), workdir=workdir)
      del record["config"]  # The table's records; the workdir has it.
      records.append(record)
      if record["status"] == "finished":
        workdirs.setdefault(method, []).append(workdir)
        if jax.process_index() == 0:  # Process 0 alone writes the outputs.
          analyses.setdefault(method, []).append(
              runs.read_json(os.path.join(workdir, loop.ANALYSIS)))
  if jax.process_index() != 0:
    return records, ""
  runs.write_json(os.path.join(root, "results.json"), records)
  finished = [r for r in records if r["status"] == "finished"]
  table = report.write_report(root, finished, workdirs, analyses,
                              methods_order=list(configs),
                              baseline=baseline or None,
                              contrasts=common.contrasts(configs, baseline))
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
  quiet_libraries()
  with user_errors():
    _run(flags.FLAGS)


def _run(opts):
  config_flag = opts["config"]
  path = config_flag.config_filename
  module = runs.load_config_module(path)
  methods = runs.known_methods(module, opts.methods)
  configs = runs.method_configs(module, methods,
                                config_flags.get_override_values(config_flag))
  root = opts.workdir or default_root("reproduce", path)
  _, table = run_all(configs, root, opts.seeds, baseline=module.baseline)
  print(f"\nResults in {root} ({opts.seeds} seeds):\n")
  print(table)


def parse_reproduce_flags(argv):
  """:func:`experiments.cli.parse_flags`, after refusing the flags of the
  tools that vary a setting (reproduce runs the config as given)."""
  if any(a.split("=", 1)[0] in ("--key", "--values") for a in argv[1:]):
    with user_errors():
      raise ValueError(
          "--key/--values vary a setting: use python -m experiments.sweep "
          "(one seed, an ablation) or python -m experiments.curve (seeds, a "
          "curve); reproduce runs the config as given (set a key with "
          "--config.KEY=V).")
  return parse_flags(argv)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_reproduce_flags)
