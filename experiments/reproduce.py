"""Every method of a config x several seeds, then the table and the figures.

  python -m experiments.reproduce \
      --config experiments/configs/transfer.py:data=digits --seeds 3 \
      [--workdir workdirs/reproduce/digits_transfer] [--out DIR] \
      [--methods ot,l2_sp] \
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
before any run; a finished run is reused, never refused.

Outputs go to ``--out`` (default: WORKDIR), small files meant to be
committed: each run's record with its config, ``OUT/runs/<method>/seed<k>.json``
(:func:`record_path`), then ``OUT/results.json`` (one
:class:`experiments.runs.Record` per run, without its config: ``method``,
``seed``, ``hyperparameters`` (each loss term's weight, weight and head
decay, by config key), ``workdir``, ``status`` ("finished" or "diverged"),
``test_accuracy_best_val``, ``test_accuracy_last``, ``val_accuracy_best``,
``best_step``, ``step``, the plan diagnostics ``matched_fraction``,
``row_max_mass``, ``plan_entropy`` per layer and ``wall_s``),
``OUT/results.md`` and the figures, and prints the table.

Resuming. A run whose record is in ``--out`` is not trained again, nor its
workdir read for the record: a rerun of a committed table on a fresh
checkout (``--out`` the folder it was committed to, no workdir) trains
nothing and writes the same results.json and results.md. A record made with
other settings than this command builds (another config file, method or
override: :func:`experiments.same_run.record_differences`, which lets only
result-neutral keys such as paths differ) is refused before any run with an
``Error:`` naming the differences: use another ``--out``. The figures need
every run's workdir (its metrics and analysis): where some record's run is
not in WORKDIR, the figures already in ``--out`` are kept as they are (the
runs that made the records drew them) and results.md links them, if this
call trained nothing; else no figure is linked. results.json and results.md
are the table this command asks for: ``--methods`` or ``--seeds`` other than
the committed command's, with its ``--out``, rewrite them as a smaller (or
larger) table, the records staying; give such a command its own ``--out``.

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
from typing import Optional

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
      "workdir", None, "Root directory of the runs (default: "
      "workdirs/reproduce/<config name>).")
  flags.DEFINE_string(
      "out", None, "Where the records, results.json, results.md and the "
      "figures go (small, meant to be committed; default: the workdir). A "
      "run with a record there is not trained again.")
  flags.DEFINE_list("methods", None,
                    "Subset of the config's methods (default: all).")
  flags.mark_flags_as_required(["config"])


def run_workdir(root: str, method: str, seed: int) -> str:
  """Where ``method``'s run of ``seed`` trains: ``ROOT/<method>/seed<k>``."""
  return os.path.join(root, method, f"seed{seed}")


def record_path(out: str, method: str, seed: int) -> str:
  """Where the record of ``method``'s run of ``seed`` is kept, with its
  config: ``OUT/runs/<method>/seed<k>.json``."""
  return os.path.join(out, "runs", method, f"seed{seed}.json")


def planned(configs: dict, root: str, seeds: int,
            out: Optional[str] = None) -> list:
  """Every run of the table, methods in order then seeds: the
  :class:`experiments.runs.Planned` of ``method`` on ``seed`` trains in
  :func:`run_workdir` with its record at :func:`record_path` in ``out``
  (default ``root``)."""
  out = out or root
  plan = []
  for method, config in configs.items():
    for seed in range(seeds):
      cfg = runs.seeded(config, seed, root)
      workdir = run_workdir(root, method, seed)
      plan.append(runs.Planned(
          cfg, workdir, record_path(out, method, seed),
          dict(method=method, seed=seed,
               hyperparameters=runs.hyperparameters(cfg), workdir=workdir)))
  return plan


def check_initialisations(configs: dict, root: str, seeds: int,
                          out: Optional[str] = None) -> None:
  """Checks every run before any trains: a record in ``out`` made with other
  settings is refused (:func:`experiments.runs.load_record`), and so is a
  student that would start from its teacher's initial weights
  (:func:`experiments.runs.check_initialisation`) on a seed left to train
  (:func:`experiments.runs.left_to_train`: a seed with a record, or a
  finished run in its workdir, is reused, never refused).

  Args:
    configs: ``{method: config}``; seeds: the table's seeds are
      ``0 .. seeds-1``; out: where the records are (default ``root``).

  Raises:
    ValueError: naming the record and its differences, or the method, the
      seed and the fix.
  """
  left = {}
  for run in planned(configs, root, seeds, out):
    runs.load_record(run.path, run.config)
    if runs.left_to_train(run):
      left.setdefault(run.base["method"], []).append(run.base["seed"])
  for method, config in configs.items():
    runs.check_initialisation(config, left.get(method, []), method)


def run_all(configs: dict, root: str, seeds: int, baseline=None,
            out: Optional[str] = None) -> tuple:
  """Runs (or reuses) every method x seed; returns the records and the table.

  Args:
    configs: ``{method: config}`` in the order of the results; the table
      pairs every method with ``baseline``, then Omega_P with the others
      (``common.contrasts``).
    root: the runs' root (``ROOT/<method>/seed<k>``, the teacher's).
    seeds: the table's seeds are ``0 .. seeds-1``.
    out: where the records and the report go (default ``root``); a run
      with a record there is reused (:func:`experiments.runs.recorded`).

  The figures are drawn from the runs' workdirs when each holds its
  record's run; else, when this call trained nothing (every record was in
  ``out``), those already in ``out`` are kept and linked (drawn by the runs
  that made the records); else none is linked.

  Returns:
    ``(records, table)``: one :class:`experiments.runs.Record` per run, without
    its config (as in ``results.json``), and the Markdown table ("" on
    processes other than 0, which write nothing).

  Raises:
    ValueError: before any run, a record in ``out`` made with other
      settings, or a run left to train that would start from its teacher's
      initial weights (:func:`check_initialisations`).
  """
  out = out or root
  check_initialisations(configs, root, seeds, out)
  records, workdirs, analyses = [], {}, {}
  absent, trained = 0, 0
  for run in planned(configs, root, seeds, out):
    kept = os.path.exists(run.path)
    record = dict(runs.recorded(run, train=_train))
    trained += not kept
    del record["config"]  # The table's records; the record file has it.
    records.append(record)
    if record["status"] != "finished":
      continue
    if not _holds(run.workdir, record):
      absent += 1
    elif jax.process_index() == 0:  # Process 0 alone writes the outputs.
      workdirs.setdefault(record["method"], []).append(run.workdir)
      analyses.setdefault(record["method"], []).append(
          runs.read_json(os.path.join(run.workdir, loop.ANALYSIS)))
  if jax.process_index() != 0:
    return records, ""
  figures = "draw" if not absent else "skip" if trained else "keep"
  if absent:
    logging.info("reproduce: %d records' runs are not in %s: %s.", absent,
                 root, "no figure is linked" if trained else
                 f"the figures in {out} are kept as they are")
  runs.write_json(os.path.join(out, "results.json"), records)
  finished = [r for r in records if r["status"] == "finished"]
  table = report.write_report(out, finished, workdirs, analyses,
                              methods_order=list(configs),
                              baseline=baseline or None,
                              contrasts=common.contrasts(configs, baseline),
                              figures=figures)
  diverged = [f"{r['method']} seed {r['seed']}" for r in records
              if r["status"] != "finished"]
  if diverged:
    note = ("\nDiverged (non-finite loss; left out of the means): "
            f"{', '.join(diverged)}.\n")
    with open(os.path.join(out, "results.md"), "a") as f:
      f.write(note)
    table += note
  return records, table


def _holds(workdir: str, record: runs.Record) -> bool:
  """Whether ``workdir`` holds ``record``'s run (finished, with its final
  metrics): the figures may be drawn from it, not from another run left
  there (other settings, another command)."""
  if not loop.is_finished(workdir):
    return False
  final = runs.read_json(os.path.join(workdir, loop.FINAL_METRICS))
  return (final["test_accuracy_at_best_val"], final["test_accuracy"],
          final["best_step"], final["step"]) == (
              record["test_accuracy_best_val"], record["test_accuracy_last"],
              record["best_step"], record["step"])


def _train(run: runs.Planned) -> runs.Record:
  """Trains (or reuses the finished workdir of) a run without a record."""
  logging.info("=== %s, seed %d -> %s", run.base["method"], run.base["seed"],
               run.workdir)
  return runs.train_record(run)


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
  out = opts.out or root
  _, table = run_all(configs, root, opts.seeds, baseline=module.baseline,
                     out=out)
  print(f"\nResults in {out} ({opts.seeds} seeds):\n")
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
