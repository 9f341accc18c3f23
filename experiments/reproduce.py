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
``WORKDIR/teacher``. Writes ``WORKDIR/results.json`` (one record per run:
``method``, ``seed``, ``status`` ("finished" or "diverged"),
``test_accuracy_best_val``, ``test_accuracy_last``, ``val_accuracy_best``,
``best_step``, ``step``, ``hyperparameters`` (each loss term's weight, weight
and head decay, by config key), ``workdir``),
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

import importlib.util
import json
import os
import types

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import loop, report
from experiments.configs import common
from experiments.cli import (config_name, default_root,  # noqa: F401
                             maybe_initialize_distributed, parse_flags,
                             quiet_libraries, user_errors)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiment config with METHODS.",
    lock_config=True)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method: 0 .. seeds-1.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Root directory (default: workdirs/<tool>/<config name>, the tool being "
    "reproduce, sweep or curve).")
_METHODS = flags.DEFINE_list("methods", None,
                             "Subset of the config's methods (default: all).")
# Shared by experiments.sweep (an ablation of one key) and experiments.curve
# (the setting a curve varies): defined once, as both may be imported together.
KEY = flags.DEFINE_string(
    "key", None, "sweep: instead of SWEEP, sweep this config key for --methods "
    "(e.g. loss.terms.ot.options.relative_epsilon); curve: the config key the "
    "curve varies (e.g. data.samples_per_class).")
VALUES = flags.DEFINE_list("values", None,
                           "The values of --key (Python literals).")
flags.mark_flags_as_required(["config"])


def load_config_module(path: str):
  """The config file ``path`` (``file.py[:ARG]``), as what reproduce and
  sweep read of it: ``get_config(method)`` (``ARG``'s other settings, e.g.
  ``data=...``, kept), ``SWEEP`` (``get_sweep(ARG)`` in a file that takes
  arguments), ``applies`` (see experiments.curve; None if absent) and
  ``__doc__``."""
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_reproduced_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = (module.get_sweep(arg or None) if hasattr(module, "get_sweep")
           else getattr(module, "SWEEP", None))
  return types.SimpleNamespace(
      __doc__=module.__doc__, SWEEP=sweep,
      applies=getattr(module, "applies", None),  # experiments.curve's.
      get_config=lambda method=None: module.get_config(
          common.with_method(arg, method)))


def method_configs(module, methods, overrides: dict) -> dict:
  """``{method: config}``: ``module.get_config(method)`` with ``overrides``.

  An override (``{"loss.terms.ot.weight": 0.5}``, as the command line gave
  it) applies to every method whose config has that key, so the command
  line always wins.
  """
  out = {}
  for method in methods:
    cfg = module.get_config(method)
    with cfg.unlocked():
      cfg.update_from_flattened_dict(
          {k: v for k, v in overrides.items() if _has_key(cfg, k)})
    out[method] = cfg
  return out


def _has_key(cfg, dotted: str) -> bool:
  node = cfg
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def hyperparameters(config) -> dict:
  """The weights a run used, by config key: each loss term's weight, weight
  decay and head decay (what a sweep chooses per method)."""
  out = {f"loss.terms.{name}.weight": term.weight
         for name, term in config.loss.terms.items()}
  out["loss.weight_decay"] = config.loss.weight_decay
  out["loss.head_decay"] = config.loss.head_decay
  return out


def seeded(config, seed: int, root: str):
  """A copy of ``config`` for ``seed``: ``config.seed`` and, unless
  ``vary_data_seed`` is False, ``data.seed``; a teacher the config trains
  goes to ``ROOT/teacher`` (unless ``teacher.workdir`` says where)."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.seed = seed
    if cfg.vary_data_seed:
      cfg.data.seed = seed
    if cfg.teacher.source == "train" and not cfg.teacher.workdir:
      cfg.teacher.workdir = os.path.join(root, "teacher")
  return cfg


def run_all(configs: dict, root: str, seeds: int, baseline=None) -> tuple:
  """Runs (or reuses) every method x seed; returns the records and the table.

  Args:
    configs: ``{method: config}`` in the order of the results.
  """
  records, runs, analyses = [], {}, {}
  for method, config in configs.items():
    for seed in range(seeds):
      cfg = seeded(config, seed, root)
      workdir = os.path.join(root, method, f"seed{seed}")
      logging.info("=== %s, seed %d -> %s", method, seed, workdir)
      try:
        final = loop.train_and_evaluate(cfg, workdir)
      except loop.Diverged as e:  # Recorded, never hidden.
        logging.error("%s seed %d diverged: %s", method, seed, e)
        records.append({"method": method, "seed": seed, "status": "diverged",
                        "test_accuracy_best_val": None,
                        "test_accuracy_last": None,
                        "hyperparameters": hyperparameters(cfg),
                        "workdir": workdir})
        continue
      records.append({
          "method": method, "seed": seed, "status": "finished",
          "test_accuracy_best_val": final["test_accuracy_at_best_val"],
          "test_accuracy_last": final["test_accuracy"],
          "val_accuracy_best": final["best_val_accuracy"],
          "best_step": final["best_step"], "step": final["step"],
          "hyperparameters": hyperparameters(cfg),
          "workdir": workdir,
      })
      runs.setdefault(method, []).append(workdir)
      if jax.process_index() == 0:  # Process 0 alone writes the outputs.
        with open(os.path.join(workdir, loop.ANALYSIS)) as f:
          analyses.setdefault(method, []).append(json.load(f))
  if jax.process_index() != 0:
    return records, ""
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump(records, f, indent=2)
  finished = [r for r in records if r["status"] == "finished"]
  table = report.write_report(root, finished, runs, analyses,
                              methods_order=list(configs),
                              baseline=baseline or None)
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
    _run()


def _run():
  if KEY.value or VALUES.value:
    # Defined here for sweep and curve; reproduce would run the config as is.
    raise ValueError(
        "--key/--values vary a setting: use python -m experiments.sweep (one "
        "seed, an ablation) or python -m experiments.curve (seeds, a curve); "
        "reproduce runs the config as given (set a key with --config.KEY=V).")
  config_flag = flags.FLAGS["config"]
  path = config_flag.config_filename
  module = load_config_module(path)
  methods = list(_METHODS.value or _CONFIG.value.method_order)
  unknown = sorted(set(methods) - set(_CONFIG.value.method_order))
  if unknown:
    raise ValueError(f"Unknown methods {unknown}; this config defines "
                     f"{list(_CONFIG.value.method_order)}.")
  configs = method_configs(module, methods,
                           config_flags.get_override_values(config_flag))
  root = _WORKDIR.value or default_root("reproduce", path)
  os.makedirs(root, exist_ok=True)
  _, table = run_all(configs, root, _SEEDS.value,
                     baseline=_CONFIG.value.baseline_method)
  print(f"\nResults in {root} ({_SEEDS.value} seeds):\n")
  print(table)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
