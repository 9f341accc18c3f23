"""Choose each method's regulariser weight on validation, over tuning seeds.

  python -m experiments.sweep \
      --config experiments/configs/transfer.py:data=fashion_mnist \
      [--tuning_seeds 100,101] [--extensions 2] [--methods ot,l2_sp] \
      [--workdir workdirs/sweep/fashion_mnist_transfer] \
      [--out docs/fashion_mnist/fashion_mnist_transfer]

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
does not check). ``--tuning_seeds`` defaults to 100,101, the protocol of the
regime studies (docs/experiments.md); the first protocol's sweeps (and
vit_distill's) were made with ``--tuning_seeds 100 --extensions 0``. A teacher trained by the config is
trained once, in ``WORKDIR/teacher``; ``--config.key=value`` overrides apply
to every run, as in ``experiments.reproduce``. A point left to train (its
workdir has no final metrics) whose student, from random weights and of its
teacher's network, would have the teacher's seed -- so start from the
teacher's own initial weights -- is refused before any run with an
``Error:`` naming the fix (:func:`experiments.runs.check_initialisation`, as
in reproduce and curve); a finished run is reused, never refused.

``--methods ot --key loss.terms.ot.options.relative_epsilon --values
0.003,0.01,0.1`` sweeps another key instead (an ablation), the same way.

A sweep is a curve with one value: each method's grid runs through
:func:`experiments.runs.tune`, the weight choice experiments.curve makes at
each of its values, with the same ``--extensions`` (default 2, as curve's):
when the best point is at an edge of the grid, the grid extends 10x that way,
at most that many times (0: never); a choice still at an edge is said to be
not bracketed. The value with the best *mean validation accuracy over the
tuning seeds* is chosen, per method and key, by that rule
(:func:`experiments.runs.bracket`: of equal accuracies, one strictly inside
the grid, else the smallest; a point with a diverged seed is never chosen,
nor one that lacks a run on a seed the other points of its grid have, since
its mean would be over other seeds); test accuracies are neither printed nor
used. Writes ``OUT/sweep.json`` (``records``: one per run, i.e. per
method, key, value and tuning seed, with ``method``, ``key``, ``value``,
``seed``, ``val_accuracy_best``, ``best_step``, ``workdir`` -- the fields of
an :class:`experiments.runs.Record` a sweep keeps -- kept across
invocations; ``grids``: ``{method: {key: [value, ...]}}``, the grid each
was given (a point of its records outside it is an extension, or an earlier
invocation's value); ``chosen``: ``{method: {key: value}}`` and ``notes``:
``{method: {key: note}}``, "" when the grid brackets the choice, else why it
does not (runs.bracket's note), both decided anew over the records of every
invocation, so a sweep.json of one seed without grids, as the first
protocol's, reads as before) and ``OUT/sweep.md`` (each grid point's
validation accuracy per seed and their mean, then each choice and its
note), and prints the table and the chosen values: copy them into the
config, with a comment naming this command. A grid point's run is kept by
its record in ``--out`` (default: WORKDIR), small files meant to be
committed: ``OUT/tuning/<method>/<config_key>=<value>/seed<t>.json``
(:func:`record_path`), with its config, as a curve's. A point with a record
there is not trained again, nor its workdir read: a rerun of a committed
sweep on a fresh checkout (``--out`` the folder it was committed to) trains
nothing; a record made with other settings than this command builds is
refused with an ``Error:`` naming the differences
(:func:`experiments.runs.load_record`). A point without a record reuses its
finished workdir (workdirs made before the tuning seeds had their directory,
``<config_key>=<value>`` without ``seed<t>``, are not reused). sweep.json
and sweep.md go to ``--out``.
"""

from experiments import interrupts

if __name__ == "__main__":  # A command (not an import): from its first line,
  interrupts.install()  # Ctrl-C / SIGTERM end in one line (imports included).

import functools
import os
from typing import Optional

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
      "tuning_seeds", ["100", "101"], "Seeds of the weight choice (their "
      "mean validation accuracy decides; the protocol's 100,101 by "
      "default; the first protocol's sweeps took 100); keep them out of "
      "the table's seeds 0 .. n-1.")
  flags.DEFINE_integer(
      "extensions", 2, "Times a grid may extend 10x past the edge its best "
      "value is at (0: never, as the first protocol's sweeps; a choice "
      "still at an edge is noted as not bracketed).")
  flags.DEFINE_string(
      "workdir", None, "Root directory of the runs (default: "
      "workdirs/sweep/<config name>).")
  flags.DEFINE_string(
      "out", None, "Where the records, sweep.json and sweep.md go (small, "
      "meant to be committed; default: the workdir). A point with a record "
      "there is not trained again.")
  flags.DEFINE_list("methods", None,
                    "Methods to sweep (default: every method of SWEEP).")
  flags.DEFINE_string(
      "key", None, "Instead of SWEEP, sweep this config key for --methods "
      "(e.g. loss.terms.ot.options.relative_epsilon).")
  flags.DEFINE_list("values", None, "The values of --key (numbers).")
  flags.mark_flags_as_required(["config"])


def parse_extensions(extensions: int) -> int:
  """``--extensions``: how often a grid may extend (:func:`runs.tune`).

  Raises:
    ValueError: a negative number, naming the fix.
  """
  if extensions < 0:
    raise ValueError(f"--extensions {extensions}: give 0 or more (0: the "
                     "grid as given, never extended; the protocol's 2).")
  return extensions


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


def choices(records, grids=None) -> dict:
  """``{(method, key): (value or None, note)}``: per swept key, the choice
  :func:`experiments.runs.tune` makes (:func:`experiments.runs.bracket` on
  :func:`grid_means`) over every point of the records, extensions included,
  and its note ("" when bracketed, else why not). ``grids``
  (``{method: {key: [value, ...]}}``, sweep.json's) names each grid as
  given: its records' other points count as extensions in the note; a key
  without one (the first protocol's sweeps) counts none. The value is the same
  whatever the grid given: bracket's choice is the best mean over every
  point, of equals one strictly inside, else the smallest."""
  out = {}
  for (method, key), grid in grid_points(records).items():
    given = (grids or {}).get(method, {}).get(key)
    base = len(grid) if given is None else sum(v in given for v in grid)
    value, _, note = runs.bracket(grid_means(grid), base=base, extensions=0)
    out[method, key] = value, note
  return out


def choose(records) -> dict:
  """``{method: {key: value}}``: :func:`choices`' values (a key whose every
  point diverged has none; the grids given change no value)."""
  chosen = {}
  for (method, key), (value, _) in choices(records).items():
    if value is not None:
      chosen.setdefault(method, {})[key] = value
  return chosen


def notes(records, grids=None) -> dict:
  """``{method: {key: note}}``: :func:`choices`' notes, "" when the grid
  brackets the choice, else why it does not (every key, a diverged one
  too)."""
  out = {}
  for (method, key), (_, note) in choices(records, grids).items():
    out.setdefault(method, {})[key] = note
  return out


def merge(old, new) -> list:
  """``old`` records with those of ``new`` replacing the same grid points."""
  point = lambda r: (r["method"], r["key"], r["value"], r["seed"])
  fresh = {point(r) for r in new}
  return [r for r in old if point(r) not in fresh] + list(new)


def merge_grids(old, new) -> dict:
  """sweep.json's ``grids`` (``{method: {key: [value, ...]}}``): ``old``'s,
  with ``new``'s grid of each method and key instead."""
  out = {m: dict(kv) for m, kv in (old or {}).items()}
  for m, kv in new.items():
    out.setdefault(m, {}).update(kv)
  return out


def markdown(records, chosen, noted=None) -> str:
  """The sweep as a Markdown table of validation accuracies, per tuning seed
  and their mean (no test numbers): one row per grid point, in the order of
  the values; then, with ``noted`` (:func:`notes`), each choice and
  whether its grid brackets it."""
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
    for value, accs in sorted(grid.items()):
      mark = " *" if chosen.get(method, {}).get(key) == value else ""
      mean = ("—" if means[value] is None and None not in accs.values()
              else pct(means[value]) + mark)
      cells = [pct(accs[s]) if s in accs else "—" for s in seeds]
      best = ", ".join(steps[method, key, value, s] if s in accs else "—"
                       for s in seeds)
      lines.append(f"| {method} | {key} | {value:g} | "
                   + "".join(f"{c} | " for c in cells) + f"{mean} | {best} |")
  if noted:
    lines += ["", "Each choice: bracketed where the chosen value has a grid "
              "point on each side; a grid whose best is at an edge "
              "extends 10x that way (--extensions times), and a choice still "
              "at an edge is not bracketed.", "",
              "| method | key | chosen | note |", "|---|---|---:|---|"]
    for (method, key) in by_grid:
      value = chosen.get(method, {}).get(key)
      note = noted.get(method, {}).get(key)
      if note is None:
        continue
      lines.append(f"| {method} | {key} | "
                   f"{'—' if value is None else f'{value:g}'} | "
                   f"{note or 'bracketed'} |")
  return "\n".join(lines) + "\n"


def sweep_grids(module, methods=None, grids=None) -> dict:
  """``{method: (key, (value, ...))}``: the grids to run, of ``methods``
  (default: every one of them), from ``grids`` (default:
  ``module.SWEEP``).

  Raises:
    ValueError: no grid, or a method without one, naming the fix.
  """
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
  return {m: grids[m] for m in methods}


def record_path(out: str, method: str, key: str, value: float,
                seed: int) -> str:
  """Where a grid point's record is kept, with its config:
  ``OUT/tuning/<method>/<key>=<value>/seed<t>.json``."""
  return os.path.join(out, "tuning", method, f"{key}={value:g}",
                      f"seed{seed}.json")


def run_sweep(module, root: str, tuning_seeds, methods=None, overrides=None,
              grids=None, extensions: int = 2, out: Optional[str] = None):
  """Runs (or reuses) every grid point of ``grids`` (default:
  ``module.SWEEP``) on each of ``tuning_seeds`` (ints), each grid extended
  at most ``extensions`` times (:func:`experiments.runs.tune`), the records
  kept in ``out`` (default ``root``; one there is reused); returns
  ``(records, chosen)``: one record per point and seed, and :func:`choose`'s
  choice, the one runs.tune made.

  Raises:
    ValueError: before any run, a negative ``extensions``, a grid key the
      method's config lacks, or a point left to train that would start from
      its teacher's initial weights
      (:func:`experiments.runs.check_initialisation`).
  """
  parse_extensions(extensions)
  grids = sweep_grids(module, methods, grids)
  plan = {m: functools.partial(_planned, module, m, key, root=root,
                               out=out or root, overrides=overrides)
          for m, (key, _) in grids.items()}
  for m, (_, values) in grids.items():  # Every check before any run.
    for value in values:
      for seed in tuning_seeds:
        run = plan[m](value, seed)
        runs.load_record(run.path, run.config)
  records = []
  for m, (key, values) in grids.items():
    tuning = runs.tune(functools.partial(_point, plan[m]), key, values,
                       tuning_seeds, extensions)
    records += [{field: r[field] for field in FIELDS}
                for rs in tuning.records.values() for r in rs]
  return records, choose(records)


def _planned(module, method: str, key: str, value: float, seed: int, *,
             root: str, out: str, overrides) -> runs.Planned:
  """The run of ``method`` with ``key = value`` on ``seed``, in
  ``ROOT/<method>/<key>=<value>/seed<seed>``, its record in ``out``
  (:func:`record_path`); refused if left to train
  (:func:`experiments.runs.left_to_train`) with its teacher's initial
  weights."""
  (cfg,) = runs.method_configs(
      module, [method], {**(overrides or {}), key: value}).values()
  if not runs.has_key(cfg, key):
    raise ValueError(f"SWEEP[{method!r}] sets {key!r}, which "
                     f"get_config({method!r}) does not have.")
  workdir = os.path.join(root, method, f"{key}={value:g}", f"seed{seed}")
  run = runs.Planned(runs.seeded(cfg, seed, root), workdir,
                     record_path(out, method, key, value, seed),
                     dict(method=method, key=key, value=value, seed=seed,
                          workdir=workdir))
  if runs.left_to_train(run):
    runs.check_initialisation(cfg, [seed], method)
  return run


def _point(plan, value: float, seed: int) -> runs.Planned:
  """``plan(value, seed)`` (:func:`_planned`), logged: the point runs next
  (an extension's too, checked as it comes)."""
  run = plan(value, seed)
  logging.info("=== sweep %s %s=%g, seed %d -> %s", run.base["method"],
               run.base["key"], value, seed, run.workdir)
  return run


def save(out: str, records, grids) -> tuple:
  """Writes ``OUT/sweep.json`` and ``OUT/sweep.md``: ``records`` and
  ``grids`` (``{method: {key: [value, ...]}}``, as given) merged with those
  of an earlier sweep.json there (:func:`merge`, :func:`merge_grids`), the
  choices and notes decided anew over them; returns ``(sweep.md's text,
  chosen, notes)``."""
  path = os.path.join(out, "sweep.json")
  if os.path.exists(path):  # Earlier sweeps of other methods or keys stay.
    saved = runs.read_json(path)
    records = merge(saved["records"], records)
    grids = merge_grids(saved.get("grids"), grids)
  chosen, noted = choose(records), notes(records, grids)
  runs.write_json(path, {"records": records, "grids": grids,
                         "chosen": chosen, "notes": noted})
  table = markdown(records, chosen, noted)
  with open(os.path.join(out, "sweep.md"), "w") as f:
    f.write(table)
  return table, chosen, noted


def main(argv):
  del argv
  quiet_libraries()
  opts = flags.FLAGS
  with user_errors():
    tuning_seeds = runs.parse_tuning_seeds(opts.tuning_seeds)
    extensions = parse_extensions(opts.extensions)
    path = opts["config"].config_filename
    module = runs.load_config_module(path)
    root = opts.workdir or default_root("sweep", path)
    out = opts.out or root
    grids = None
    if opts.key or opts.values:
      if not (opts.key and opts.values and opts.methods):
        raise ValueError("--key needs --values and --methods.")
      values = tuple(float(v) for v in opts.values)
      if len(set(values)) != len(values):
        raise ValueError(f"--values {','.join(opts.values)} repeats a "
                         "value.")
      grids = {m: (opts.key, values) for m in opts.methods}
    grids = sweep_grids(module, opts.methods, grids)
    records, _ = run_sweep(module, root, tuning_seeds, list(grids),
                           config_flags.get_override_values(opts["config"]),
                           grids, extensions, out)
    table, chosen, noted = save(
        out, records, {m: {key: list(values)}
                        for m, (key, values) in grids.items()})
    print(f"\nSweep in {out}:\n\n{table}\nChosen on validation:")
    for method, kv in noted.items():
      for key, note in kv.items():
        value = chosen.get(method, {}).get(key)
        print(f"  {method}: {key}="
              + ("none" if value is None else f"{value:g}")
              + f" ({note or 'bracketed'})")


def parse_sweep_flags(argv):
  """:func:`experiments.cli.parse_flags`, after pointing a ``--seed`` (the
  one tuning seed of older commands) to the flag that replaced it."""
  if any(a.split("=", 1)[0] == "--seed" for a in argv[1:]):
    with user_errors():
      raise ValueError(
          "--seed is now --tuning_seeds, a list whose mean validation "
          "accuracy chooses: --tuning_seeds 100,101 (the default) is the "
          "protocol's choice, --tuning_seeds 100 the first protocol's.")
  return parse_flags(argv)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_sweep_flags)
