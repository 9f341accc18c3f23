"""Choose each method's regulariser weight on validation, over tuning seeds.

  python -m experiments.sweep \
      --config experiments/configs/transfer.py:data=fashion_mnist \
      [--tuning_seeds 100,101] [--methods ot,l2_sp] \
      [--workdir workdirs/sweep/fashion_mnist_transfer]

The config file lists its grids in a module-level ``SWEEP = {method:
(config_key, (value, ...))}``, e.g. ``{"ot": ("loss.terms.ot.weight", (0.01,
0.1, 1.0))}``; a file that takes arguments, like transfer.py, returns them
from ``get_sweep(ARG)`` for ``--config file.py:ARG``. For each method, value
and tuning seed ``t``, ``get_config(method)`` with ``config_key = value``
trains in ``WORKDIR/<method>/<config_key>=<value>/seed<t>`` with
``config.seed = t`` (and ``config.data.seed = t`` unless
``config.vary_data_seed`` is False): take tuning seeds that the table's seeds
(0 .. n-1) do not use, so the weights are chosen on data draws and
initialisations of their own (the sweep cannot know the table's seeds, so it
does not check). ``--tuning_seeds`` defaults to 100, the seed of the
committed sweeps; the protocol of the regime studies (docs/experiments.md)
takes 100,101. A teacher trained by the config is trained once, in
``WORKDIR/teacher``; ``--config.key=value`` overrides apply to every run, as
in ``experiments.reproduce``.

``--methods ot --key loss.terms.ot.options.relative_epsilon --values
0.003,0.01,0.1`` sweeps another key instead (an ablation), the same way.

A sweep is a curve with one value: each method's grid runs through
:func:`experiments.runs.tune`, the weight choice experiments.curve makes at
each of its values, here without extending the grid. The value with the best
*mean validation accuracy over the tuning seeds* is chosen, per method and
key, by that rule (:func:`experiments.runs.bracket` without extensions: of
equal accuracies, one strictly inside the grid, else the smallest; a point
with a diverged seed is never chosen, nor one that lacks a run on a seed the
other points of its grid have, since its mean would be over other seeds);
test accuracies are neither printed nor used. Writes ``WORKDIR/sweep.json``
(``records``: one per run, i.e. per method, key, value and tuning seed, with
``method``, ``key``, ``value``, ``seed``, ``val_accuracy_best``,
``best_step``, ``workdir`` -- the fields of an
:class:`experiments.runs.Record` a sweep keeps -- kept across invocations;
``chosen``: ``{method: {key: value}}``, chosen anew over the records of every
invocation, so a sweep.json of one seed, as the committed ones, reads as
before) and ``WORKDIR/sweep.md`` (each grid point's validation accuracy per
seed and their mean), and prints the table and the chosen values: copy them
into the config, with a comment naming this command. A grid point's run is
kept by its workdir alone (a finished one is reused), not by a record file as
a curve's; workdirs made before the tuning seeds had their directory
(``<config_key>=<value>`` without ``seed<t>``) are not reused.
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
  flags.DEFINE_list(
      "tuning_seeds", ["100"], "Seeds of the weight choice (their mean "
      "validation accuracy decides; the protocol takes 100,101); keep them "
      "out of the table's seeds 0 .. n-1.")
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


def grid_points(records) -> dict:
  """``{(method, key): {value: {seed: val_accuracy_best or None}}}`` of
  sweep.json records, in the order they come."""
  out = {}
  for r in records:
    out.setdefault((r["method"], r["key"]), {}).setdefault(
        r["value"], {})[r["seed"]] = r["val_accuracy_best"]
  return out


def grid_seeds(grid) -> list:
  """The tuning seeds of one grid (a value of :func:`grid_points`): every
  seed some point of it ran, sorted."""
  return sorted({seed for accs in grid.values() for seed in accs})


def grid_means(grid) -> dict:
  """``{value: mean validation accuracy over the grid's seeds}``: None for a
  point with a diverged seed (as :func:`experiments.runs.tune`) or without a
  run on one of :func:`grid_seeds` (a mean over other seeds compares
  nothing)."""
  seeds = grid_seeds(grid)
  return {value: runs.mean_or_none([accs.get(s) for s in seeds])
          for value, accs in grid.items()}


def choose(records) -> dict:
  """``{method: {key: value}}``: per swept key, the value of best mean
  validation accuracy over the tuning seeds (:func:`grid_means`,
  :func:`experiments.runs.bracket` without extensions)."""
  chosen = {}
  for (method, key), grid in grid_points(records).items():
    value = runs.bracket(grid_means(grid), base=len(grid), extensions=0)[0]
    if value is not None:
      chosen.setdefault(method, {})[key] = value
  return chosen


def merge(old, new) -> list:
  """``old`` records with those of ``new`` replacing the same grid points."""
  point = lambda r: (r["method"], r["key"], r["value"], r["seed"])
  fresh = {point(r) for r in new}
  return [r for r in old if point(r) not in fresh] + list(new)


def markdown(records, chosen) -> str:
  """The sweep as a Markdown table of validation accuracies, per tuning seed
  and their mean (no test numbers): one row per grid point."""
  by_grid = grid_points(records)
  seeds = sorted({r["seed"] for r in records})
  steps = {(r["method"], r["key"], r["value"], r["seed"]):
           "—" if r["best_step"] is None else str(r["best_step"])
           for r in records}
  pct = lambda a: "diverged" if a is None else f"{100 * a:.2f}"
  lines = [f"Validation accuracy (%) at the best evaluation step on tuning "
           f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}, and "
           "the mean over a grid's seeds, which chooses (* = chosen; a point "
           "with a diverged seed or without a run on one of its grid's "
           "seeds, —, is never chosen). Best step per seed.", "",
           "| method | key | value | "
           + "".join(f"seed {s} | " for s in seeds) + "mean | best step |",
           "|---|---|---:|" + "---:|" * (len(seeds) + 2)]
  for (method, key), grid in by_grid.items():
    means = grid_means(grid)
    for value, accs in grid.items():
      mark = " *" if chosen.get(method, {}).get(key) == value else ""
      mean = ("—" if means[value] is None and None not in accs.values()
              else pct(means[value]) + mark)
      cells = [pct(accs[s]) if s in accs else "—" for s in seeds]
      best = ", ".join(steps[method, key, value, s] if s in accs else "—"
                       for s in seeds)
      lines.append(f"| {method} | {key} | {value:g} | "
                   + "".join(f"{c} | " for c in cells) + f"{mean} | {best} |")
  return "\n".join(lines) + "\n"


def run_sweep(module, root: str, tuning_seeds, methods=None, overrides=None,
              grids=None):
  """Runs (or reuses) every grid point of ``grids`` (default:
  ``module.SWEEP``) on each of ``tuning_seeds`` (ints); returns ``(records,
  chosen)``: one record per point and seed, and :func:`choose`'s choice."""
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
    tuning = runs.tune(point, key, values, tuning_seeds)  # No extensions.
    records += [{field: r[field] for field in FIELDS}
                for rs in tuning.records.values() for r in rs]
  return records, choose(records)


def _point(module, method: str, key: str, value: float, seed: int, *,
           root: str, overrides) -> runs.Planned:
  """The run of ``method`` with ``key = value`` on ``seed``, in
  ``ROOT/<method>/<key>=<value>/seed<seed>``."""
  (cfg,) = runs.method_configs(
      module, [method], {**(overrides or {}), key: value}).values()
  if not runs.has_key(cfg, key):
    raise ValueError(f"SWEEP[{method!r}] sets {key!r}, which "
                     f"get_config({method!r}) does not have.")
  workdir = os.path.join(root, method, f"{key}={value:g}", f"seed{seed}")
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
    tuning_seeds = runs.parse_tuning_seeds(opts.tuning_seeds)
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
    records, _ = run_sweep(module, root, tuning_seeds, opts.methods,
                           config_flags.get_override_values(opts["config"]),
                           grids)
    path = os.path.join(root, "sweep.json")
    if os.path.exists(path):  # Earlier sweeps of other methods or keys stay.
      records = merge(runs.read_json(path)["records"], records)
    chosen = choose(records)
    runs.write_json(path, {"records": records, "chosen": chosen})
    table = markdown(records, chosen)
    with open(os.path.join(root, "sweep.md"), "w") as f:
      f.write(table)
    print(f"\nSweep in {root}:\n\n{table}\nChosen on validation:")
    for method, kv in chosen.items():
      for key, value in kv.items():
        print(f"  {method}: {key}={value:g}")


def parse_sweep_flags(argv):
  """:func:`experiments.cli.parse_flags`, after pointing a ``--seed`` (the
  one tuning seed of older commands) to the flag that replaced it."""
  if any(a.split("=", 1)[0] == "--seed" for a in argv[1:]):
    with user_errors():
      raise ValueError(
          "--seed is now --tuning_seeds, a list whose mean validation "
          "accuracy chooses: --tuning_seeds 100 is the committed sweeps' "
          "choice, --tuning_seeds 100,101 the protocol's.")
  return parse_flags(argv)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_sweep_flags)
