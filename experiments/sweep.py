"""Choose each method's regulariser weight on the validation split, on a tuning seed.

  python -m experiments.sweep \
      --config experiments/configs/transfer.py:data=fashion_mnist [--seed 100] \
      [--workdir workdirs/sweep/fashion_mnist_transfer] [--methods ot,l2_sp]

The config file lists its grids in a module-level ``SWEEP = {method:
(config_key, (value, ...))}``, e.g. ``{"ot": ("loss.terms.ot.weight", (0.01,
0.1, 1.0))}``; a file that takes arguments, like transfer.py, returns them
from ``get_sweep(ARG)`` for ``--config file.py:ARG``. For each method and
value, ``get_config(method)`` with
``config_key = value`` trains in ``WORKDIR/<method>/<config_key>=<value>`` with
``config.seed = seed`` (and ``config.data.seed = seed`` unless
``config.vary_data_seed`` is False): take a tuning seed that the table's seeds
(0 .. n-1) do not use, so the weights are chosen on a data draw and an
initialisation of their own. A teacher trained by the config is trained once,
in ``WORKDIR/teacher``; ``--config.key=value`` overrides apply to every run,
as in ``experiments.reproduce``.

``--methods ot --key loss.terms.ot.options.relative_epsilon --values
0.003,0.01,0.1`` sweeps another key instead (an ablation), the same way.

A sweep is a curve with one value: each method's grid runs through
:func:`experiments.runs.tune`, the weight choice experiments.curve makes at
each of its values, here on the one tuning seed and without extending the
grid. The value with the best *validation* accuracy is chosen, per method
and key, by that rule (:func:`experiments.runs.bracket` without extensions:
of equal accuracies, one strictly inside the grid, else the smallest); test
accuracies are neither printed nor used. Writes
``WORKDIR/sweep.json`` (``records``: one per run with ``method``, ``key``,
``value``, ``seed``, ``val_accuracy_best``, ``best_step``, ``workdir`` -- the
fields of an :class:`experiments.runs.Record` a sweep keeps -- kept across
invocations; ``chosen``: ``{method: {key: value}}``, chosen anew over the
records of every invocation) and ``WORKDIR/sweep.md``, and prints the table
and the chosen values: copy them into the config, with a comment naming this
command. A grid point's run is kept by its workdir alone (a finished one is
reused), not by a record file as a curve's.
"""

from experiments import interrupts

if __name__ == "__main__":  # A command (not an import): from its first line,
  interrupts.install()  # Ctrl-C / SIGTERM end in one line (imports included).

import functools
import os

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import runs
from experiments.cli import (default_root, parse_flags, quiet_libraries,
                             user_errors)

#: The fields of a run's record that sweep.json keeps (no test accuracy).
FIELDS = ("method", "key", "value", "seed", "val_accuracy_best", "best_step",
          "workdir")


def define_flags() -> None:
  """This tool's flags, defined when it runs (``python -m``)."""
  config_flags.DEFINE_config_file(
      "config", None, "Path to an experiment config with SWEEP or "
      "get_sweep.", lock_config=True)
  flags.DEFINE_integer(
      "seed", 100, "Tuning seed; keep it out of the table's seeds 0 .. n-1.")
  flags.DEFINE_string(
      "workdir", None, "Root directory (default: workdirs/sweep/<config "
      "name>).")
  flags.DEFINE_list("methods", None,
                    "Methods to sweep (default: every method of SWEEP).")
  flags.DEFINE_string(
      "key", None, "Instead of SWEEP, sweep this config key for --methods "
      "(e.g. loss.terms.ot.options.relative_epsilon).")
  flags.DEFINE_list("values", None, "The values of --key (numbers).")
  flags.mark_flags_as_required(["config"])


def choose(records) -> dict:
  """``{method: {key: value}}``: per swept key, the value of best validation
  accuracy (:func:`experiments.runs.bracket`; diverged runs never)."""
  points = {}
  for r in records:
    points.setdefault((r["method"], r["key"]), {})[r["value"]] = (
        r["val_accuracy_best"])
  chosen = {}
  for (method, key), grid in points.items():
    value = runs.bracket(grid, base=len(grid), extensions=0)[0]
    if value is not None:
      chosen.setdefault(method, {})[key] = value
  return chosen


def merge(old, new) -> list:
  """``old`` records with those of ``new`` replacing the same grid points."""
  point = lambda r: (r["method"], r["key"], r["value"], r["seed"])
  fresh = {point(r) for r in new}
  return [r for r in old if point(r) not in fresh] + list(new)


def markdown(records, chosen, seed) -> str:
  """The sweep as a Markdown table of validation accuracies (no test numbers)."""
  lines = [f"Validation accuracy (%) at the best evaluation step, tuning seed "
           f"{seed}; * = chosen.", "",
           "| method | key | value | val acc | best step |",
           "|---|---|---:|---:|---:|"]
  for r in records:
    mark = " *" if chosen.get(r["method"], {}).get(r["key"]) == r["value"] else ""
    acc = ("diverged" if r["val_accuracy_best"] is None
           else f"{100 * r['val_accuracy_best']:.2f}{mark}")
    lines.append(f"| {r['method']} | {r['key']} | {r['value']:g} | {acc} | "
                 f"{r['best_step']} |")
  return "\n".join(lines) + "\n"


def run_sweep(module, root: str, seed: int, methods=None, overrides=None,
              grids=None):
  """Runs (or reuses) every grid point of ``grids`` (default:
  ``module.SWEEP``); returns ``(records, chosen)``."""
  grids = grids or getattr(module, "SWEEP", None)
  if not grids:
    raise ValueError("This config has no sweep grids: add SWEEP = {method: "
                     "(config_key, (value, ...))} next to its methods (or "
                     "return them from get_sweep(ARG) for file.py:ARG).")
  methods = list(methods or grids)
  unknown = sorted(set(methods) - set(grids))
  if unknown:
    raise ValueError(f"No sweep grid for {unknown}; this config sweeps "
                     f"{sorted(grids)}.")
  records = []
  for method in methods:
    key, values = grids[method]
    point = functools.partial(_point, module, method, key, root=root,
                              overrides=overrides)
    tuning = runs.tune(point, key, values, [seed])  # No extensions.
    records += [{field: r[field] for field in FIELDS}
                for rs in tuning.records.values() for r in rs]
  return records, choose(records)


def _point(module, method: str, key: str, value: float, seed: int, *,
           root: str, overrides) -> runs.Planned:
  """The run of ``method`` with ``key = value`` on ``seed``, in
  ``ROOT/<method>/<key>=<value>``."""
  (cfg,) = runs.method_configs(
      module, [method], {**(overrides or {}), key: value}).values()
  if not runs.has_key(cfg, key):
    raise ValueError(f"SWEEP[{method!r}] sets {key!r}, which "
                     f"get_config({method!r}) does not have.")
  workdir = os.path.join(root, method, f"{key}={value:g}")
  logging.info("=== sweep %s %s=%g, seed %d -> %s", method, key, value,
               seed, workdir)
  return runs.Planned(runs.seeded(cfg, seed, root), workdir, None,
                      dict(method=method, key=key, value=value, seed=seed,
                           workdir=workdir))


def main(argv):
  del argv
  quiet_libraries()
  opts = flags.FLAGS
  with user_errors():
    path = opts["config"].config_filename
    module = runs.load_config_module(path)
    root = opts.workdir or default_root("sweep", path)
    os.makedirs(root, exist_ok=True)
    grids = None
    if opts.key or opts.values:
      if not (opts.key and opts.values and opts.methods):
        raise ValueError("--key needs --values and --methods.")
      values = tuple(float(v) for v in opts.values)
      grids = {m: (opts.key, values) for m in opts.methods}
    records, _ = run_sweep(module, root, opts.seed, opts.methods,
                           config_flags.get_override_values(opts["config"]),
                           grids)
    path = os.path.join(root, "sweep.json")
    if os.path.exists(path):  # Earlier sweeps of other methods or keys stay.
      records = merge(runs.read_json(path)["records"], records)
    chosen = choose(records)
    runs.write_json(path, {"records": records, "chosen": chosen})
    table = markdown(records, chosen, opts.seed)
    with open(os.path.join(root, "sweep.md"), "w") as f:
      f.write(table)
    print(f"\nSweep in {root}:\n\n{table}\nChosen on validation:")
    for method, kv in chosen.items():
      for key, value in kv.items():
        print(f"  {method}: {key}={value:g}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
