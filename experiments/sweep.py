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

The value with the best *validation* accuracy (the first of equals, in grid
order) is chosen, per method and key; test accuracies are neither printed nor
used. Writes ``WORKDIR/sweep.json`` (``records``: one per run with ``method``,
``key``, ``value``, ``seed``, ``val_accuracy_best``, ``best_step``,
``workdir``, kept across invocations; ``chosen``: ``{method: {key: value}}``)
and ``WORKDIR/sweep.md``, and prints the table and the chosen values: copy
them into the config, with a comment naming this command.
"""

from experiments import interrupts

if __name__ == "__main__":  # A command (not an import): from its first line,
  interrupts.install()  # Ctrl-C / SIGTERM end in one line (imports included).

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import loop, reproduce
from experiments.cli import (default_root, parse_flags, quiet_libraries,
                             user_errors)

# --config, --workdir and --methods are experiments.reproduce's flags (this
# module imports it); these are the sweep's own.
_SEED = flags.DEFINE_integer(
    "seed", 100, "Tuning seed; keep it out of the table's seeds 0 .. n-1.")
_KEY, _VALUES = reproduce.KEY, reproduce.VALUES  # --key, --values


def choose(records) -> dict:
  """``{method: {key: value}}``: per swept key, the value of best validation
  accuracy (the first of equals, in grid order; diverged runs never)."""
  chosen, best = {}, {}
  for r in records:  # In grid order.
    acc, where = r["val_accuracy_best"], (r["method"], r["key"])
    if acc is not None and (where not in best or acc > best[where]):
      best[where] = acc
      chosen.setdefault(r["method"], {})[r["key"]] = r["value"]
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
    for value in values:
      (cfg,) = reproduce.method_configs(
          module, [method], {**(overrides or {}), key: value}).values()
      if not reproduce._has_key(cfg, key):
        raise ValueError(f"SWEEP[{method!r}] sets {key!r}, which "
                         f"get_config({method!r}) does not have.")
      cfg = reproduce.seeded(cfg, seed, root)
      if cfg.data.val_per_class is None and cfg.data.val_fraction is None:
        raise ValueError("The sweep chooses on the validation split, but this "
                         "config has none: set data.val_per_class.")
      workdir = os.path.join(root, method, f"{key}={value:g}")
      logging.info("=== sweep %s %s=%g, seed %d -> %s", method, key, value,
                   seed, workdir)
      try:
        final = loop.train_and_evaluate(cfg, workdir)
        val, step = final["best_val_accuracy"], final["best_step"]
      except loop.Diverged as e:  # Recorded, never chosen.
        logging.error("%s %s=%g diverged: %s", method, key, value, e)
        val, step = None, None
      records.append({"method": method, "key": key, "value": value,
                      "seed": seed, "val_accuracy_best": val,
                      "best_step": step, "workdir": workdir})
  return records, choose(records)


def main(argv):
  del argv
  quiet_libraries()
  with user_errors():
    opts = {"seed": _SEED.value, "key": _KEY.value, "values": _VALUES.value,
         "workdir": flags.FLAGS.workdir, "methods": flags.FLAGS.methods}
    flag = flags.FLAGS["config"]
    path = flag.config_filename
    module = reproduce.load_config_module(path)
    root = opts["workdir"] or default_root("sweep", path)
    os.makedirs(root, exist_ok=True)
    grids = None
    if opts["key"] or opts["values"]:
      if not (opts["key"] and opts["values"] and opts["methods"]):
        raise ValueError("--key needs --values and --methods.")
      values = tuple(float(v) for v in opts["values"])
      grids = {m: (opts["key"], values) for m in opts["methods"]}
    records, _ = run_sweep(module, root, opts["seed"], opts["methods"],
                           config_flags.get_override_values(flag), grids)
    path = os.path.join(root, "sweep.json")
    if os.path.exists(path):  # Earlier sweeps of other methods or keys stay.
      with open(path) as f:
        records = merge(json.load(f)["records"], records)
    chosen = choose(records)
    with open(path, "w") as f:
      json.dump({"records": records, "chosen": chosen}, f, indent=2)
    table = markdown(records, chosen, opts["seed"])
    with open(os.path.join(root, "sweep.md"), "w") as f:
      f.write(table)
    print(f"\nSweep in {root}:\n\n{table}\nChosen on validation:")
    for method, kv in chosen.items():
      for key, value in kv.items():
        print(f"  {method}: {key}={value:g}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
