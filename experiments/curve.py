"""Test accuracy against one config key: every method, its weight chosen per value on validation.

  python -m experiments.curve \
      --config experiments/configs/regimes.py:study=permutation \
      --key init_permuted --values False,True --seeds 10 \
      --out docs/regimes/permutation [--workdir workdirs/regimes/permutation] \
      [--methods none,ot] [--focus ot] [--grid ot=0.01,0.1,1] \
      [--tuning_seeds 100,101] [--every_weight] [--config.key=value ...]

For each value ``v`` of ``--key`` (any key of the config: ``--config.key=v``
for every run of that value):

1. **Weights, on validation.** Each method with a grid (the config file's
   ``SWEEP = {method: (config_key, (value, ...))}`` or ``get_sweep(ARG)``, as
   for experiments.sweep, or ``--grid method=v1,v2,...`` on
   ``loss.terms.<method>.weight`` unless ``SWEEP`` names another key) trains
   once per grid point and tuning seed (``config.seed`` and ``data.seed`` =
   each of ``--tuning_seeds``, none of which a table seed may equal) and
   keeps the point of best *mean* validation accuracy over the tuning seeds
   (:func:`experiments.runs.tune`, the weight grid of experiments.sweep
   too): one seed's few hundred validation images choose little better
   than chance between neighbouring grid points. When the best point is at
   an edge of the grid, the grid extends 10x that way, at most
   ``--extensions`` (2) times; a choice still at an edge is recorded as not
   bracketed. Methods without a grid run with the config's values.
2. **The table.** Every method x seed ``0 .. seeds-1`` with the chosen weight
   (``runs.seeded``: for a seed, every method sees the same data and
   initialisation). A student from random weights whose seed equals its
   teacher's (same architecture) is refused before any run: it would start
   from the teacher's own initial weights.
3. **Every weight** (``--every_weight`` only; off by default). The table
   seeds again, as one block apart from the table: the baseline (the first
   method, without a grid) and each method at every weight of its final
   grid (the tuning's, extensions and weights that diverged in tuning
   included; none where every tuning run diverged): where a term starts to
   hurt, on 10 seeds rather than the 2 tuning seeds. A block of its own, so
   that its differences never pair runs of two trainings of the teacher (a
   study resumed on another machine retrains it). Cost: (the sum of the
   grids' sizes + 1) x seeds runs per value.

Every table gives both reads -- test accuracy at the best-validation step and
at the last step -- each with the paired differences; a verdict that holds in
one read only is not a verdict.

A config file may define ``applies(method, config) -> bool`` (e.g. Omega_I
only where student and teacher widths are equal); a method that does not
apply at a value is skipped there and shown as such. It may define
``get_inherited(arg=None) -> {method: {config key: other method}}``: that key
of the method's runs takes the weight chosen for the other method (tuned
first) at the same value -- KD's weight in Omega_P + KD -- shown beside the
method's own weight in results.md.

A teacher the config trains (``teacher.source='train'``) is trained once,
before any run (so that no run's ``wall_s`` includes it), in
``WORKDIR/teacher`` (or ``teacher.workdir``), and shared by every value,
method and seed, unless ``teacher.job`` depends on the key: then each value
trains its own in ``<teacher dir>/<key>=<value>`` and the log says so.

Outputs. In ``--out`` (small files, meant to be committed):

* ``runs/<key>=<value>/<method>/seed<k>.json``: one record per table run
  (:class:`experiments.runs.Record`):
  ``kind`` ("run"), ``key``, ``value``, ``label``, ``method``, ``seed``,
  ``weights`` (``runs.hyperparameters``), ``status`` ("finished" |
  "diverged"),
  ``test_accuracy_best_val``, ``test_accuracy_last``, ``val_accuracy_best``,
  ``best_step``, ``step``, the plan diagnostics of the run's
  ``analysis.json`` (``{layer: float | None}`` each, ``runs.PLAN_MEASURES``:
  ``matched_fraction``, the trace of the OT plan between the trained
  student's and the teacher's layer, ``row_max_mass`` and ``plan_entropy``,
  which see a matching under any permutation), ``wall_s`` (seconds of the
  call that produced it) and ``config`` (the run's config, JSON);
* ``tuning/<key>=<value>/<method>/<weight key>=<weight>/seed<t>.json``: the
  same for each tuning run (``kind`` "tuning", ``seed`` the tuning seed);
* ``every_weight/<key>=<value>/<method>/[weight=<weight>/]seed<k>.json``
  (with ``--every_weight``): the same for the block's runs (``kind``
  "every_weight", ``weight`` the grid weight, None for the baseline);
* ``results.json``: ``{"command", "key", "values", "methods", "seeds",
  "tuning_seeds", "focus" (a method; a list of several), "wall_s":
  {"tuning", "runs"[, "every_weight"]}, "chosen": {value: {method: {"key",
  "weight", "grid": {weight: mean val acc}, "test": {weight: mean test
  acc}, "bracketed", "note"}}}, "runs": [every table record without its
  config], "every_weight_runs": (with ``--every_weight``) [the block's
  records], "teachers": (where recorded) teachers.json}``; ``command`` is
  :func:`command`'s canonical form of the flags that made it (absent from
  records written before it);
* ``teachers.json``: ``{teacher workdir: [{"model", "kwargs", "step",
  "test_accuracy", "best_step", "test_accuracy_at_best_val"}, ...]}``: each
  distinct training of a teacher the runs read (the weights of its last
  step; a session on another machine may retrain it a little differently);
* ``results.md``: the command that reruns the study (where results.json
  has one); the teacher's test accuracy; per value, mean +- standard
  error per method at both reads and the paired differences ``--focus``
  (Omega_P: ``ot``) minus every other method on the same seeds (mean, s.e.,
  on how many seeds it was better) at both reads; the plan diagnostics per
  layer; then, along the key, each method's change from the first value
  and the interaction [(focus - m) at a value] - [(focus - m) at the first
  value], both paired by seed at both reads; then every tuning grid with its
  mean validation accuracies and the choice. Several ``--focus`` methods
  (``ot_kd,ot``): a table of pairs and an interaction section per focus
  method, in that order, each pair once (:func:`focus_pairs`). With
  ``--every_weight``, per value after the plan diagnostics, "Every weight
  of the grid (table seeds)": the block's baseline (the first method: the
  config's, no term, unless ``--methods`` puts another first), then per
  method with a grid and weight both reads and the paired difference
  against that baseline; and, along the key after each method's change, the
  same change per method at each weight both values' grids share, from the
  block's runs (:func:`every_weight_along`);
* ``curve.png``: accuracy against the value (mean +- s.e. per method) and the
  paired difference focus - each method against the value (mean +- s.e.;
  the first focus method's).

In ``--workdir`` (large, disposable): each run's ``experiments.main``
workdir (checkpoints, metrics) and the teacher.

Resuming. A rerun of the same command reuses every record in ``--out`` and
trains only what is missing (a run interrupted in ``--workdir`` resumes from
its checkpoint), so a fresh checkout of the committed records, without the
workdir, continues where the last session stopped (retraining the teacher
first if it is needed). A record whose config is another result than the
one this command builds now (another config file, override or value:
:func:`experiments.same_run.record_differences`, which lets only
result-neutral keys such as paths differ and counts a key that a record made
before it existed lacks as its default) is refused with an ``Error:`` naming
the differences: use another ``--out``. ``--every_weight`` reads and writes
its records only when given: a rerun without it trains none of them and
leaves those in ``--out`` as they are, but its results.json and results.md
have no every-weight section (and the wall time none of theirs); rerun with
the flag to show them.
"""

from __future__ import annotations

from experiments import interrupts

if __name__ == "__main__":  # A command (not an import): from its first line,
  interrupts.install()  # Ctrl-C / SIGTERM end in one line (imports included).

import ast
import copy
import difflib
import json
import os
import shlex
import time
from typing import Any, Optional, Sequence

import numpy as np
from absl import app, flags, logging
from matplotlib.figure import Figure
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import config_path

from experiments import job as job_lib
from experiments import loop, runs
from experiments.cli import (default_root, parse_flags, quiet_libraries,
                             user_errors)
# The paired difference and the two reads are reproduce's too (report).
from experiments.report import (READS, mean_se, paired, paired_cells,
                                paired_header, paired_rows)
from ot_transfer_jax import checkpoint


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 argv: Optional[Sequence[str]] = None) -> None:
  """This tool's flags, defined when it runs (``python -m``): reproduce,
  sweep and curve each define their own, so that they import together.
  ``flag_values`` and ``argv`` (the command line whose ``--config.key``
  overrides to define; default sys.argv) read another command line, e.g. a
  results.json's ``command``."""
  # Every DEFINE below goes to flag_values, the global FLAGS by default.
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file(
      "config", None, "Path to an experiment config with methods.",
      lock_config=True, sys_argv=None if argv is None else list(argv), **fv)
  flags.DEFINE_string(
      "key", None, "The config key the curve varies (e.g. "
      "data.samples_per_class).", **fv)
  flags.DEFINE_list("values", None, "The values of --key (Python literals).",
                    **fv)
  flags.DEFINE_integer("seeds", 3, "Table seeds per point: 0 .. seeds-1.",
                       **fv)
  flags.DEFINE_list("methods", None,
                    "Subset of the config's methods (default: all).", **fv)
  flags.DEFINE_string(
      "out", None, "Directory of the records, tables and figure "
      "(committed).", **fv)
  flags.DEFINE_string(
      "workdir", None, "Directory of the runs' workdirs and teachers "
      "(default: workdirs/curve/<config name>).", **fv)
  flags.DEFINE_list(
      "tuning_seeds", ["100", "101"], "Seeds of the weight choice (their "
      "mean validation accuracy decides); no table seed may equal one.", **fv)
  flags.DEFINE_multi_string(
      "grid", [], "METHOD=V1,V2,...: this method's weight grid (instead of "
      "the config's SWEEP).", **fv)
  flags.DEFINE_integer(
      "extensions", 2, "Times a grid may extend 10x past the edge its best "
      "value is at.", **fv)
  flags.DEFINE_list(
      "focus", ["ot"], "The methods, in this order, whose paired "
      "differences against every other method are tabulated (a pair once: "
      "A - B, not also B - A); the first one's are drawn.", **fv)
  flags.DEFINE_bool(
      "every_weight", False, "Also run the table seeds as one block at every "
      "weight of each method's final grid, and the baseline (records in "
      "every_weight/; a section of results.md).", **fv)
  flags.mark_flags_as_required(["config"], flag_values=flag_values)


# ---------------------------------------------------------------------------
# Pure parts: values, grids, comparisons, tables
# ---------------------------------------------------------------------------


def parse_values(strings: Sequence[str]) -> list:
  """``["2", "0.5", "True"]`` -> ``[2, 0.5, True]`` (Python literals; other
  words stay strings). Raises ValueError for none or repeated values."""
  if not strings:
    raise ValueError("--values is empty: give the key's values, e.g. "
                     "--values 2,5,10.")
  values = []
  for s in strings:
    try:
      values.append(ast.literal_eval(s.strip()))
    except (ValueError, SyntaxError):
      values.append(s.strip())
  if len(set(map(repr, values))) != len(values):
    raise ValueError(f"--values {','.join(strings)} repeats a value.")
  return values


def label(key: str, value: Any) -> str:
  """The directory name of a value: ``samples_per_class=10``."""
  text = f"{value:g}" if isinstance(value, float) else str(value)
  return f"{key.rsplit('.', 1)[-1]}={text}"


# In --out: {teacher workdir: its model and final metrics} (Curve.teachers).
TEACHERS = "teachers.json"


def _by_value(records, values):
  return {label_: [r for r in records if r["label"] == label_]
          for label_ in values}


def tuning_seeds(summary: dict) -> list:
  """The tuning seeds of a ``results.json`` (older ones had one)."""
  return list(summary.get("tuning_seeds") or [summary["tuning_seed"]])


def focus_methods(focus) -> list:
  """``--focus`` or results.json's ``focus`` as a list of methods: a string
  is one method or several comma-separated (results.json holds a string
  for one, as every one written before several could be, else a list)."""
  if isinstance(focus, str):
    return [f.strip() for f in focus.split(",")]
  return list(focus)


def parse_focus(focus, methods: Sequence[str]) -> list:
  """The ``--focus`` methods (:func:`focus_methods`), each one of
  ``methods`` and none twice; raises ValueError naming the fix."""
  focus = focus_methods(focus)
  if not focus or not all(focus):  # [] from --focus '', ["ot", ""] from ot,
    raise ValueError(f"--focus {','.join(focus)!r} names no method or an "
                     "empty one: e.g. --focus ot or --focus ot_kd,ot.")
  unknown = [f for f in focus if f not in methods]
  if unknown:
    one = len(unknown) == 1
    raise ValueError(
        f"--focus {', '.join(unknown)} {'is' if one else 'are'} not one of "
        f"the methods {list(methods)}: add {'it' if one else 'them'} to "
        "--methods or pass --focus.")
  if len(set(focus)) != len(focus):
    raise ValueError(f"--focus {','.join(focus)} repeats a method.")
  return focus


def focus_pairs(summary: dict) -> list:
  """``[(focus method, [methods it is paired with])]`` in ``--focus``'s
  order: every other method but one an earlier focus method was already
  paired with (A - B once: B - A is its negative)."""
  given, out = set(), []
  for f in focus_methods(summary["focus"]):
    others = [m for m in summary["methods"]
              if m != f and frozenset((f, m)) not in given]
    given |= {frozenset((f, m)) for m in others}
    out.append((f, others))
  return out


def _cell(values: Sequence[float]) -> str:
  return "%.2f ± %.2f" % mean_se(values) if values else ""


def markdown(summary: dict) -> str:
  """``results.md`` from a ``results.json`` dict."""
  key, methods = summary["key"], summary["methods"]
  tseeds = tuning_seeds(summary)
  out = [f"# Test accuracy against `{key}`", ""]
  if "command" in summary:  # Older results.json have none.
    out += ["Command (rerun it to regenerate this page; it trains only what "
            "is missing):", "", "```bash", command_lines(summary["command"]),
            "```", ""]
  out += [f"{summary['seeds']} seeds per point (0 .. {summary['seeds'] - 1}); "
         "each weight chosen on the mean validation accuracy of tuning "
         f"seed{'s' * (len(tseeds) > 1)} {', '.join(map(str, tseeds))} "
         "(grids at the end; no table seed tunes). Test accuracy (%) at the "
         "best-validation step and at the last step, mean ± standard error "
         "over seeds; n = finished seeds.", ""]
  if len(tseeds) < 2:
    out += ["Weights chosen on one tuning seed: below the protocol of "
            "docs/experiments.md (two or more), so each choice carries that "
            "seed's validation noise.", ""]
  if "wall_s" in summary:
    w = summary["wall_s"]
    # Every weight only where it ran: earlier results.md stay as they were.
    every = (f", every weight {w['every_weight'] / 60:.0f} min"
             if "every_weight" in w else "")
    out += [f"Wall time of the recorded runs (summed over the sessions that "
            f"made them; the teacher not included): tuning "
            f"{w['tuning'] / 60:.0f} min, table {w['runs'] / 60:.0f} min"
            f"{every}.", ""]
  for workdir, trainings in summary.get("teachers", {}).items():
    t = trainings[0]
    acc = lambda k: " / ".join("—" if t.get(k) is None else
                               f"{100 * t[k]:.2f}" for t in trainings)
    out += [f"Teacher `{workdir}` ({t['model']} {t['kwargs']}): test accuracy "
            f"{acc('test_accuracy')} % at its last step {t['step']}, the "
            f"weights the runs read ({acc('test_accuracy_at_best_val')} % at "
            f"its best validation step "
            f"{' / '.join(str(t['best_step']) for t in trainings)})"
            + (f"; trained {len(trainings)} times by the sessions that made "
               "the records (another machine's float rounding)."
               if len(trainings) > 1 else "."), ""]
  by_value = _by_value(summary["runs"], [label(key, v) for v in summary["values"]])
  for value in summary["values"]:
    records = by_value[label(key, value)]
    out += [f"## {key} = {value}", "",
            "| method | weight | n | test acc @ best val | test acc @ last | "
            "best step: median (at 1st / last eval) |",
            "|---|---|---:|---:|---:|---:|"]
    chosen = summary["chosen"].get(label(key, value), {})
    for m in methods:
      rs = [r for r in records if r["method"] == m]
      done = [r for r in rs if r["status"] == "finished"]
      weight = chosen.get(m, {}).get("weight")
      wtext = "—" if weight is None else f"{weight:g}"
      for k, w in chosen.get(m, {}).get("inherited", {}).items():
        wtext += f", {k.removeprefix('loss.terms.')} {w:g}"
      if rs and rs[0].get("skipped"):
        out.append(f"| {m} | — | 0 | does not apply | |")
        continue
      if not done:
        out.append(f"| {m} | {wtext} | 0 | | |")
        continue
      out.append(f"| {m} | {wtext} | {_n_and_reads(rs)} | "
                 f"{best_steps(done)} |")
    for focus, others in focus_pairs(summary):  # A table per focus method.
      rows = paired_rows(records, [(focus, m, f"{focus} − {m}")
                                   for m in others])
      if rows:
        out += ["", "Paired differences (same seeds, points): mean, s.e., "
                f"seeds on which {focus} was better.", "",
                *paired_header("pair"), *rows]
    for measure, meaning in runs.PLAN_MEASURES.items():
      out += plan_table(records, methods, measure, meaning)
    out += every_weight_table(summary, value)
    out.append("")
  out += (across_values(summary, by_value) + every_weight_along(summary)
          + interactions(summary, by_value))
  out += ["## Weights chosen on validation", "",
          "Validation accuracy (%) at the best step, mean over tuning seeds "
          f"{', '.join(map(str, tseeds))} (test accuracy at that step in "
          "brackets, for reading only: it chooses nothing); * = chosen.", "",
          f"| {key} | method | weight key | grid → val acc (test) | note |",
          "|---|---|---|---|---|"]
  for value in summary["values"]:
    for m, c in summary["chosen"].get(label(key, value), {}).items():
      tests = c.get("test", {})
      grid = ", ".join(
          f"{float(w):g} → " + ("diverged" if a is None else f"{100 * a:.1f}")
          + (f" ({100 * tests[w]:.1f})" if tests.get(w) is not None else "")
          + (" *" if c["weight"] is not None and float(w) == c["weight"]
             else "")
          for w, a in sorted(c["grid"].items(), key=lambda kv: float(kv[0])))
      out.append(f"| {value} | {m} | {c['key']} | {grid} | "
                 f"{c['note'] or 'bracketed'} |")
  return "\n".join(out) + "\n"


def command_lines(command: str) -> str:
  """``command`` one flag a line, joined by the shell's line continuations
  (the same words, quoted as :func:`command` quotes them)."""
  lines = []
  for word in shlex.split(command):
    if word.startswith("--") or not lines:
      lines.append([])
    lines[-1].append(shlex.quote(word))
  return " \\\n    ".join(" ".join(line) for line in lines)


def _n_and_reads(records: Sequence[dict]) -> str:
  """Table cells of one method's runs: ``n (+k diverged) | best-val read |
  last read``, each read mean ± s.e. in %."""
  done = [r for r in records if r["status"] == "finished"]
  diverged = len(records) - len(done)
  n = f"{len(done)}" + (f" (+{diverged} diverged)" if diverged else "")
  return " | ".join([n, *(_cell([100 * r[k] for r in done]) for k in READS)])


def every_weight_table(summary: dict, value) -> list[str]:
  """Lines of the section "Every weight of the grid (table seeds)" at
  ``value`` ([] without ``summary["every_weight_runs"]``, curve's
  ``--every_weight``): the baseline, then per method with a grid one row
  per weight of its grid (* = chosen), both reads and the paired
  difference against the baseline, all from the block's own runs."""
  if "every_weight_runs" not in summary:
    return []
  vl, baseline = label(summary["key"], value), summary["methods"][0]
  every = [r for r in summary["every_weight_runs"] if r["label"] == vl]
  base = [r for r in every if r["method"] == baseline]
  rows = [f"| {baseline} | — | {_n_and_reads(base)} |{' |' * 6}"] if base else []
  for m, c in summary["chosen"].get(vl, {}).items():
    for w in sorted(c["grid"], key=float):  # "0.01": the f"{w:g}" keys.
      chosen = c["weight"] is not None and float(w) == c["weight"]
      rs = [r for r in every if r["method"] == m
            and f"{r['weight']:g}" == w]
      if not rs:
        continue
      # Renamed: at a weight, a method is paired with the baseline.
      name = f"{m} at {w}"
      pairs = [paired([{**r, "method": name} for r in rs] + base, name,
                      baseline, read) for read in READS]
      diffs = paired_cells(pairs) if all(pairs) else " | ".join([""] * 6)
      rows.append(f"| {m} | {w}{' *' * chosen} | {_n_and_reads(rs)} | "
                  f"{diffs} |")
  if not rows:
    return []
  return ["", "### Every weight of the grid (table seeds)", "",
          "The table seeds again, as one block of runs apart from the "
          f"table's: {baseline}, and each method at every weight of its grid "
          "(extensions included; * = chosen on validation). Test accuracy "
          "(%) at both reads, mean ± s.e.; the paired difference with "
          f"{baseline} (same seeds, points): mean, s.e., seeds on which the "
          f"weight beat {baseline}.", "",
          "| method | weight | n | test acc @ best val | test acc @ last | "
          "best val: mean | s.e. | better | last: mean | s.e. | better |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows]


def best_steps(records: Sequence[dict]) -> str:
  """The median best-validation step of finished runs, and how many peaked
  at the first evaluation (too coarse or too strong a term) or at the last
  (undertrained): ``"1875 (0 / 1)"``; ``?`` where a record lacks
  ``eval_every`` (results written before it was kept)."""
  if not records:
    return ""
  median = float(np.median([r["best_step"] for r in records]))
  last = sum(r["best_step"] == r["step"] for r in records)
  if any(r.get("eval_every") is None for r in records):
    first = "?"
  else:
    first = sum(r["best_step"] == min(r["eval_every"], r["step"])
                for r in records)
  return f"{median:g} ({first} / {last})"


def across_values(summary: dict, by_value: dict) -> list[str]:
  """Lines of a Markdown table: per method, each value's test accuracy minus
  the first value's, paired by seed, at both reads (how a method's result
  moves along the key; e.g. what permuting the start costs each term)."""
  key, values = summary["key"], summary["values"]
  rows = []
  for value in values[1:]:
    for m in summary["methods"]:
      pairs = []
      for read in READS:
        recs = [{**r, "method": r["label"]} for v in (value, values[0])
                for r in by_value[label(key, v)] if r["method"] == m]
        pairs.append(paired(recs, label(key, value), label(key, values[0]),
                            read))
      if all(pairs):
        rows.append(_along_row(m, value, values[0], pairs))
  return _along_table(
      f"## Along `{key}`, per method",
      f"Each value's test accuracy minus that at {key} = {values[0]}, "
      "paired by seed (points): mean, s.e., seeds on which it was higher. "
      "The weights are each value's own choice.", "method", "higher", rows)


def every_weight_along(summary: dict) -> list[str]:
  """Lines of a Markdown table (``--every_weight`` only): per method and
  weight on the grids of both values, each value's test accuracy minus the
  first value's at the same weight, paired by seed, from the block's own runs
  (the baseline too) -- what moving along the key costs a term at a fixed
  weight (e.g. the weight from which permuting the start hurts Omega_I, not
  Omega_P), free of each value's own choice of weight."""
  if "every_weight_runs" not in summary:
    return []
  key, values = summary["key"], summary["values"]
  every, first = summary["every_weight_runs"], label(key, values[0])

  def weights(m, vl) -> set:
    return {r["weight"] for r in every if r["method"] == m
            and r["label"] == vl}

  rows = []
  for value in values[1:]:
    vl = label(key, value)
    for m in summary["methods"]:
      # None (the baseline, no grid) first, then the grid in order.
      for w in sorted(weights(m, vl) & weights(m, first),
                      key=lambda w: (w is not None, w or 0.0)):
        recs = [{**r, "method": r["label"]} for r in every
                if r["method"] == m and r["weight"] == w
                and r["label"] in (vl, first)]
        pairs = [paired(recs, vl, first, read) for read in READS]
        if all(pairs):
          name = m if w is None else f"{m} at {w:g}"
          rows.append(_along_row(name, value, values[0], pairs))
  return _along_table(
      f"## Along `{key}`, per method at each weight (every weight)",
      f"Each value's test accuracy minus that at {key} = {values[0]}, at "
      "the same weight, paired by seed, from the every-weight block's runs "
      "(points): mean, s.e., seeds on which it was higher.",
      "method at weight", "higher", rows)


def interactions(summary: dict, by_value: dict) -> list[str]:
  """Lines of a Markdown table per focus method: per method m it is paired
  with (:func:`focus_pairs`), how focus - m moves along the key,
  [(focus - m) at a value] - [(focus - m) at the first value], per seed
  (e.g. whether Omega_P's gain over scratch grows for a narrower student)."""
  return [line for focus, others in focus_pairs(summary)
          for line in _interaction(summary, by_value, focus, others)]


def _interaction(summary: dict, by_value: dict, focus: str,
                 others: Sequence[str]) -> list[str]:
  """:func:`interactions`' table of one focus method against ``others``."""
  key, values = summary["key"], summary["values"]

  def gaps(value, m, read) -> list[dict]:
    """focus - m per seed at ``value``, as records of method label(value)."""
    acc = {}
    for r in by_value[label(key, value)]:
      if r["status"] == "finished" and r["method"] in (focus, m):
        acc.setdefault(r["method"], {})[r["seed"]] = r[read]
    seeds = set(acc.get(focus, {})) & set(acc.get(m, {}))
    return [{"status": "finished", "method": label(key, value), "seed": s,
             read: acc[focus][s] - acc[m][s]} for s in seeds]

  rows = []
  for value in values[1:]:
    for m in others:
      pairs = [paired(gaps(value, m, read) + gaps(values[0], m, read),
                      label(key, value), label(key, values[0]), read)
               for read in READS]
      if all(pairs):
        rows.append(_along_row(f"{focus} − {m}", value, values[0], pairs))
  return _along_table(
      f"## Interaction: {focus}'s gap along `{key}`",
      f"[({focus} − m) at a value] − [({focus} − m) at {key} = "
      f"{values[0]}], paired by seed (points): mean, s.e., seeds on which "
      "the gap was larger there.", "pair", "larger", rows)


def _along_row(name: str, value, first, pairs) -> str:
  return (f"| {name} | {value} − {first} | {pairs[0][3]} | "
          f"{paired_cells(pairs)} |")


def _along_table(title: str, caption: str, first: str, larger: str,
                 rows: list[str]) -> list[str]:
  """A table of differences along the key at both reads ([] without rows)."""
  if not rows:
    return []
  return [title, "", caption, "",
          f"| {first} | values | n | best val: mean | s.e. | {larger} | "
          f"last: mean | s.e. | {larger} |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|", *rows, ""]


def plan_table(records, methods, measure: str, meaning: str) -> list[str]:
  """Lines of a Markdown table: per method, the mean ± s.e. over seeds of
  each layer's ``measure`` (``runs.PLAN_MEASURES``) after training; none
  without any."""
  layers = list(dict.fromkeys(
      l for r in records for l, v in (r.get(measure) or {}).items()
      if v is not None))
  if not layers:
    return []
  out = ["", f"After training, per layer: {meaning}; mean ± s.e. (OT plan "
         "between the student's and the teacher's layer on validation "
         "images):", "", f"| method | {' | '.join(layers)} |",
         "|---|" + "---:|" * len(layers)]
  for m in methods:
    cells = []
    for layer in layers:
      v = [r[measure][layer] for r in records
           if r["method"] == m and r["status"] == "finished"
           and (r.get(measure) or {}).get(layer) is not None]
      cells.append("%.3f ± %.3f" % mean_se(v) if v else "")
    if any(cells):
      out.append(f"| {m} | {' | '.join(cells)} |")
  return out


def plot(summary: dict, path: str) -> None:
  """``curve.png``: accuracy (left) and focus - each method (right) against
  the value, mean ± s.e. over seeds (the first focus method's: one
  panel stays readable)."""
  key, methods = summary["key"], summary["methods"]
  focus = focus_methods(summary["focus"])[0]
  values = summary["values"]
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in values)
  xs = values if numeric else list(range(len(values)))
  by_value = _by_value(summary["runs"], [label(key, v) for v in values])
  fig = Figure(figsize=(11, 4), layout="constrained")
  ax_acc, ax_diff = fig.subplots(1, 2)
  for i, m in enumerate(methods):
    pts, diffs = [], []
    for x, v in zip(xs, values):
      done = [100 * r["test_accuracy_best_val"] for r in by_value[label(key, v)]
              if r["method"] == m and r["status"] == "finished"]
      if done:
        pts.append((x, *mean_se(done)))
      for read, line in zip(READS, ("-", "--")):
        p = (paired(by_value[label(key, v)], focus, m, read)
             if m != focus else None)
        if p:
          diffs.append((line, x, p[0], p[1]))
    if pts:
      x, mean, se = np.array(sorted(pts)).T
      ax_acc.errorbar(x, mean, se, color=f"C{i % 10}", marker="o", capsize=3,
                      label=m)
    for line, read in zip(("-", "--"), READS.values()):
      rows = sorted(d[1:] for d in diffs if d[0] == line)
      if rows:
        x, mean, se = np.array(rows).T
        ax_diff.errorbar(x, mean, se, color=f"C{i % 10}", marker="o",
                         linestyle=line, capsize=3,
                         label=f"{focus} − {m} ({read})")
  ax_diff.axhline(0, color="k", linewidth=0.8)
  spread = numeric and min(values) > 0 and max(values) / min(values) >= 8
  for ax, title in ((ax_acc, "test accuracy (%), mean ± s.e."),
                    (ax_diff, f"paired difference {focus} − method (points)")):
    ax.set_title(title)
    ax.set_xlabel(key)
    if spread:
      ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(v) for v in values])
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend(fontsize=8)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------
# Runs and records
# ---------------------------------------------------------------------------


class Curve:
  """One curve command: its configs, records and runs."""

  def __init__(self, module, key: str, values: list, methods: list,
               seeds: int, out: str, workdir: str, overrides: dict,
               tuning_seeds: Sequence[int] = (100, 101),
               grids: Optional[dict] = None,
               extensions: int = 2, focus: str | Sequence[str] = "ot",
               every_weight: bool = False, command: Optional[str] = None):
    self.module, self.key, self.values = module, key, values
    self.command = command  # In results.json and results.md, where given.
    self.every_weight = every_weight
    self.seeds, self.out, self.workdir = seeds, out, workdir
    self.extensions = extensions
    if seeds < 1:
      raise ValueError(f"--seeds {seeds}: need at least 1.")
    self.tuning_seeds = runs.parse_tuning_seeds(tuning_seeds, seeds)
    methods = runs.known_methods(module, methods)
    self.focus = parse_focus(focus, methods)
    self.methods, self.overrides = methods, dict(overrides)
    self.base = runs.method_configs(module, methods, overrides)
    for m, cfg in self.base.items():
      if not runs.has_key(cfg, key):
        keys = sorted(runs.flatten(cfg.to_dict()))
        near = difflib.get_close_matches(key, keys, n=3)
        raise ValueError(
            f"--key {key}: get_config({m!r}) has no such key"
            + (f" (did you mean {', '.join(near)}?)" if near else "")
            + ". See experiments/configs/common.py for every key.")
    self.grids = self._grids(grids or {})
    self.inherited = self._inherited()
    self._tuned = {}  # (value label, method) -> Curve.tune's choice.
    # Build every value's config now: a bad value fails before any run
    # (without the inherited weights, which need the tuning runs).
    self.configs = {label(key, v): {m: self.at(m, v, inherit=False)
                                    for m in methods}
                    for v in values}
    self.teacher_per_value = self._teacher_depends_on_value()
    self._check_initialisations()
    self.done_s, self.done_n = 0.0, 0
    # Of the records, all sessions; every weight only where it runs.
    self.wall_s = {"tuning": 0.0, "runs": 0.0,
                   **({"every_weight": 0.0} if every_weight else {})}

  def _grids(self, given: dict) -> dict:
    sweep = dict(getattr(self.module, "SWEEP", {}) or {})
    for m in given:
      if m not in self.methods:
        raise ValueError(f"--grid {m}=...: {m} is not one of the methods "
                         f"{self.methods}.")
    grids = {}
    for m in self.methods:
      if m in given:
        wkey = sweep[m][0] if m in sweep else self._term_weight(m)
        grids[m] = (wkey, tuple(sorted(given[m])))
      elif m in sweep:
        grids[m] = (sweep[m][0], tuple(sorted(sweep[m][1])))
      else:
        continue
      if not runs.has_key(self.base[m], grids[m][0]):
        raise ValueError(
            f"The weight grid of {m} sets {grids[m][0]}, which "
            f"get_config({m!r}) does not have (its terms: "
            f"{list(self.base[m].loss.terms.keys())}): name the key in the "
            f"config file's SWEEP or get_sweep, e.g. {{{m!r}: "
            "('loss.terms.<term>.weight', (0.01, 0.1))}.")
    return grids

  def _term_weight(self, method: str) -> str:
    """The weight key a ``--grid`` of ``method`` sets when the config file
    lists no grid for it: its own term's, or the one term its config has
    (``ot_uniform`` is the ``ot`` term with other options)."""
    terms = list(self.base[method].loss.terms.keys())
    if method in terms or len(terms) != 1:
      return f"loss.terms.{method}.weight"
    return f"loss.terms.{terms[0]}.weight"

  def _inherited(self) -> dict:
    """``{method: {config key: other method}}`` (the config file's
    ``get_inherited(ARG)``): the key takes the weight chosen for the other
    method at the same value, e.g. KD's in Omega_P + KD."""
    inherited = dict(getattr(self.module, "inherited", None) or {})
    for m, keys in inherited.items():
      if m not in self.methods:
        continue
      for k, other in keys.items():
        if (other not in self.grids
            or self.methods.index(other) > self.methods.index(m)):
          raise ValueError(
              f"{m} takes {k} from the weight chosen for {other}: {other} "
              "must be one of the methods, with a grid, before it (add it "
              "to --methods).")
        if not runs.has_key(self.base[m], k):
          raise ValueError(f"{m} takes {k} from {other}'s choice, but "
                           f"get_config({m!r}) has no such key.")
    return inherited

  def _inherited_weights(self, method: str, value) -> dict:
    """``{config key: weight}`` ``method`` takes from other methods' choices
    at ``value`` (tuning them first if they are not yet)."""
    weights = {}
    for k, other in self.inherited.get(method, {}).items():
      weights[k] = self.tune(value, other)["weight"]
      if weights[k] is None:
        raise ValueError(f"{method} takes {k} from {other}, whose every "
                         f"tuning run at {self.key}={value!r} diverged.")
    return weights

  def at(self, method: str, value, weight=None, inherit: bool = True):
    """``method``'s config at ``value`` (and ``weight`` on its grid key;
    with ``inherit``, the weights it takes from other methods' choices at
    ``value``, which tunes those methods first if they are not yet)."""
    overrides = {**self.overrides, self.key: value}
    if inherit:
      overrides.update(self._inherited_weights(method, value))
    if weight is not None:
      overrides[self.grids[method][0]] = weight
    try:  # Built anew: references (batch_size = 5 x K) follow the value.
      (cfg,) = runs.method_configs(self.module, [method],
                                        overrides).values()
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise ValueError(f"--values: {self.key}={value!r} does not fit "
                       f"get_config({method!r}): {e}") from None
    return cfg

  def _teacher_depends_on_value(self) -> bool:
    jobs = {json.dumps(checkpoint.config_to_json(cfgs[m].teacher.job),
                       sort_keys=True)
            for cfgs in self.configs.values() for m in cfgs
            if cfgs[m].teacher.source == "train"}
    if len(jobs) > 1:
      logging.warning("teacher.job depends on %s: each value trains its own "
                      "teacher.", self.key)
    return len(jobs) > 1

  def _check_initialisations(self) -> None:
    """A student from random weights must not start from its teacher's
    initial weights (:func:`experiments.runs.check_initialisation`).
    Checked for every table run still to train, and the tuning seeds."""
    for vl, cfgs in self.configs.items():
      for m, cfg in cfgs.items():
        # Every table seed where every-weight runs are left to train.
        every = self._every_weight_left(vl, m) > 0
        seeds = [s for s in range(self.seeds)
                 if every or not os.path.exists(self._run_path(vl, m, s))]
        runs.check_initialisation(cfg, seeds + self.tuning_seeds,
                                  f"{m} at {vl}")

  def applies(self, method, cfg) -> bool:
    check = getattr(self.module, "applies", None)
    return check is None or bool(check(method, cfg))

  def seeded(self, cfg, seed: int, value_label: str):
    cfg = runs.seeded(cfg, seed, self.workdir)
    if self.teacher_per_value and cfg.teacher.source == "train":
      with cfg.unlocked():
        cfg.teacher.workdir = os.path.join(cfg.teacher.workdir, value_label)
    return cfg

  # Records ----------------------------------------------------------------

  def _train(self, run: runs.Planned) -> dict:
    """Trains a run without a record (``runs.recorded``'s ``train``)."""
    record = runs.train_record(run)
    self.done_s += record["wall_s"]
    self.done_n += 1
    self._progress(record)
    return record

  def _progress(self, record) -> None:
    left = self._pending()
    per = self.done_s / max(self.done_n, 1)
    eta = per * left
    logging.info(
        "curve: %s %s %s seed %s done in %.0f s; %d runs left (at least), ETA "
        "%d min", record["label"], record["method"], record["kind"],
        record["seed"], record["wall_s"], left, round(eta / 60))

  def _pending(self) -> int:
    """Runs without a record (tuning grids counted at their base size)."""
    n = 0
    for vl, cfgs in self.configs.items():
      for m, cfg in cfgs.items():
        if not self.applies(m, cfg):
          continue
        if m in self.grids:
          wkey, grid = self.grids[m]
          n += sum(not os.path.exists(self._tuning_path(vl, m, w, t))
                   for w in grid for t in self.tuning_seeds)
        n += sum(not os.path.exists(self._run_path(vl, m, s))
                 for s in range(self.seeds))
        n += self._every_weight_left(vl, m)
    return n

  def _every_weight_left(self, vl, method) -> int:
    """``--every_weight`` runs of ``method`` at ``vl`` without a record (0
    without the flag): the table seeds at every weight of its grid (before
    it is tuned, the base grid and the weights its tuning records ran), or
    of the baseline."""
    weights = self._every_weights(vl, method)
    return sum(not os.path.exists(self._weight_path(vl, method, w, seed))
               for w in weights for seed in range(self.seeds))

  def _every_weights(self, vl, method, tuned=None) -> list:
    """The weights ``--every_weight`` runs ``method`` at: its final grid
    (``tuned``, :meth:`tune`'s choice, default the one made so far; none
    where every tuning run diverged), ``[None]`` for the baseline (the first
    method, without a grid: its config as it is), else none."""
    if not self.every_weight:
      return []
    if method not in self.grids:
      return [None] if method == self.methods[0] else []
    tuned = tuned or self._tuned.get((vl, method))
    if tuned:
      return [] if tuned["weight"] is None else sorted(tuned["grid"])
    return self._tuned_weights(vl, method)

  def _tuned_weights(self, vl, method) -> list:
    """The weights of ``method``'s grid at ``vl`` before it is tuned: the
    base grid and those its tuning records in ``--out`` ran (an extension
    past an edge, which a resumed study must count too)."""
    folder = os.path.join(self.out, "tuning", vl, method)
    ran = ([float(d.rsplit("=", 1)[1]) for d in os.listdir(folder)
            if "=" in d] if os.path.isdir(folder) else [])
    return sorted(set(self.grids[method][1]) | set(ran))

  def _tuning_path(self, vl, method, weight, seed) -> str:
    wkey = self.grids[method][0].rsplit(".", 2)
    wname = ".".join(wkey[-2:]) if wkey[-1] == "weight" else wkey[-1]
    return os.path.join(self.out, "tuning", vl, method,
                        f"{wname}={weight:g}", f"seed{seed}.json")

  def _run_path(self, vl, method, seed) -> str:
    return os.path.join(self.out, "runs", vl, method, f"seed{seed}.json")

  def _weight_path(self, vl, method, weight, seed) -> str:
    """An ``--every_weight`` record (``weight`` None: the baseline's)."""
    return os.path.join(self.out, "every_weight", vl,
                        *_every_where(method, weight), f"seed{seed}.json")

  # The steps --------------------------------------------------------------

  def tune(self, value, method) -> dict:
    """``{"key", "weight", "grid": {weight: mean val acc}, "test": {weight:
    mean test acc at the best-val step}, "bracketed", "note"}``: means over
    the tuning seeds (None where one diverged)."""
    vl = label(self.key, value)
    if (vl, method) in self._tuned:  # Read once: wall time counted once.
      return self._tuned[vl, method]
    wkey, grid = self.grids[method]
    tuning = runs.tune(
        lambda w, t: self._tuning_point(value, vl, method, w, t), wkey, grid,
        self.tuning_seeds, self.extensions, train=self._train)
    for records in tuning.records.values():
      for record in records:
        self.wall_s["tuning"] += record["wall_s"]
    self._tuned[vl, method] = {
        "key": wkey, "weight": tuning.weight, "grid": tuning.grid,
        "test": tuning.test, "bracketed": not tuning.note,
        "note": tuning.note}
    return self._tuned[vl, method]

  def _tuning_point(self, value, vl, method, weight, seed) -> runs.Planned:
    """The run of ``weight`` on tuning seed ``seed`` at ``value``."""
    return self._planned(
        "tuning", value, method, weight, seed,
        ("tuning", method, f"{weight:g}", f"seed{seed}"),
        self._tuning_path(vl, method, weight, seed))

  def _planned(self, kind, value, method, weight, seed, where: tuple,
               path: str, extra: Optional[dict] = None) -> runs.Planned:
    """A run of ``method`` at ``value`` (and ``weight``, None: the
    config's) on ``seed``, in ``WORKDIR/<value label>/<where...>``, its
    record kept at ``path`` and starting with ``_base``'s fields and
    ``extra``."""
    vl = label(self.key, value)
    cfg = self.seeded(self.at(method, value, weight), seed, vl)
    return runs.Planned(cfg, os.path.join(self.workdir, vl, *where), path,
                        {**self._base(kind, value, method, seed, cfg),
                         **(extra or {})})

  def _recorded(self, run: runs.Planned, bucket: str) -> runs.Record:
    """``run``'s record (kept or trained), its wall time added to
    ``bucket`` of ``wall_s``."""
    record = runs.recorded(run, train=self._train)
    self.wall_s[bucket] += record["wall_s"]
    return record

  def _base(self, kind, value, method, seed, cfg) -> dict:
    return {"kind": kind, "key": self.key, "value": value,
            "label": label(self.key, value), "method": method, "seed": seed,
            "weights": runs.hyperparameters(cfg)}

  def teachers(self) -> None:
    """Trains (or restores) every teacher a missing run needs, before any
    run: no run's wall time includes a teacher's. Each teacher that runs are
    about to read is added to ``<out>/teachers.json`` (its final metrics): a
    table is read against how good its teacher is. A study resumed on
    another machine retrains its teacher, whose weights float rounding may
    change: each distinct training the records read is listed."""
    if not self._pending():
      return
    ready = set()
    for vl, cfgs in self.configs.items():
      for cfg in cfgs.values():
        cfg = self.seeded(cfg, 0, vl)
        if cfg.teacher.source != "train" or cfg.teacher.workdir in ready:
          continue
        start = time.time()
        loop.ensure_teacher(cfg, self.workdir)
        ready.add(cfg.teacher.workdir)
        logging.info("curve: teacher in %s ready after %.0f s",
                     cfg.teacher.workdir, time.time() - start)
        self._record_teacher(cfg)

  def _record_teacher(self, cfg) -> None:
    metrics = runs.read_json(os.path.join(
        job_lib.teacher_workdir(cfg, self.workdir), loop.FINAL_METRICS))
    entry = {"model": cfg.teacher.job.model.name,
             "kwargs": dict(cfg.teacher.job.model.kwargs),
             **{k: metrics[k] for k in ("step", "test_accuracy", "best_step",
                                        "test_accuracy_at_best_val")}}
    path = os.path.join(self.out, TEACHERS)
    teachers = runs.read_json(path) if os.path.exists(path) else {}
    trainings = teachers.setdefault(cfg.teacher.workdir, [])
    if entry not in trainings:
      trainings.append(entry)
      os.makedirs(self.out, exist_ok=True)
      runs.write_json(path, teachers, indent=1)

  def run(self) -> dict:
    """Every value: weights, then method x seed; writes the outputs."""
    self.teachers()
    chosen, table, every = {}, [], []
    for value in self.values:
      vl = label(self.key, value)
      chosen[vl] = {}
      for m in self.methods:
        if not self.applies(m, self.configs[vl][m]):
          table.append({**self._base("run", value, m, None,
                                    self.configs[vl][m]),
                       "status": "skipped", "skipped": True})
          continue
        weight = None
        if m in self.grids:
          chosen[vl][m] = dict(self.tune(value, m))
          if m in self.inherited:
            chosen[vl][m]["inherited"] = self._inherited_weights(m, value)
          weight = chosen[vl][m]["weight"]
          if weight is None:
            logging.error("%s at %s: every tuning run diverged; no table "
                          "runs.", m, vl)
        if m not in self.grids or weight is not None:
          table += [self._recorded(self._planned(
              "run", value, m, weight, seed, (m, f"seed{seed}"),
              self._run_path(vl, m, seed)), "runs")
                    for seed in range(self.seeds)]
        every += self.every_weight_runs(value, m)
      self.write(chosen, table, every)  # Tables grow value by value.
    return self.write(chosen, table, every)

  def every_weight_runs(self, value, method) -> list:
    """``--every_weight``: the records of the table seeds at every weight
    of ``method``'s final grid at ``value`` (the chosen one too), or of the
    baseline, trained where missing. One block of runs apart from the
    table's, so that its comparisons never mix runs made in other sessions
    (whose retrained teacher may differ) with its own."""
    vl = label(self.key, value)
    tuned = self.tune(value, method) if method in self.grids else None
    return [self._recorded(self._planned(
        "every_weight", value, method, w, seed,
        ("every_weight", *_every_where(method, w), f"seed{seed}"),
        self._weight_path(vl, method, w, seed), {"weight": w}),
        "every_weight")
            for w in self._every_weights(vl, method, tuned)
            for seed in range(self.seeds)]

  def write(self, chosen, table, every=()) -> dict:
    """Writes results.json, results.md and curve.png of the records so
    far (``every``: the ``--every_weight`` records) and returns the
    summary."""
    summary = {**({"command": self.command} if self.command else {}),
               "key": self.key, "values": self.values,
               "methods": self.methods, "seeds": self.seeds,
               "tuning_seeds": self.tuning_seeds,
               # One method as a string: results.json as before several.
               "focus": (self.focus[0] if len(self.focus) == 1
                         else self.focus),
               "wall_s": {k: round(v, 1) for k, v in self.wall_s.items()},
               "chosen": {vl: {m: {**c, **{
                   part: {f"{w:g}": a for w, a in c[part].items()}
                   for part in ("grid", "test")}}
                               for m, c in cs.items()}
                          for vl, cs in chosen.items()},
               "runs": [_summary_record(r) for r in table]}
    if self.every_weight:  # Only then: the studies' results.json unchanged.
      summary["every_weight_runs"] = [_summary_record(r) for r in every]
    teachers = os.path.join(self.out, TEACHERS)
    if os.path.exists(teachers):
      summary["teachers"] = runs.read_json(teachers)
    os.makedirs(self.out, exist_ok=True)
    runs.write_json(os.path.join(self.out, "results.json"), summary, indent=1)
    with open(os.path.join(self.out, "results.md"), "w",
              encoding="utf-8") as f:
      f.write(markdown(summary))
    plot(summary, os.path.join(self.out, "curve.png"))
    return summary


def _every_where(method: str, weight: Optional[float]) -> tuple:
  """The folders of an ``--every_weight`` run below ``<out>/every_weight/
  <value>/`` and ``<workdir>/<value>/every_weight/``: a block apart from the
  table's runs (``weight`` None: the baseline's)."""
  return (method, *(() if weight is None else (f"weight={weight:g}",)))


def _summary_record(record: dict) -> dict:
  """A record in results.json: its config left out but for ``eval_every``
  (the first evaluation, for ``best_steps``)."""
  out = {k: v for k, v in record.items() if k != "config"}
  if "config" in record:
    out["eval_every"] = record["config"]["eval_every"]
  return out


def parse_grids(specs: Sequence[str]) -> dict:
  """``["ot=0.01,0.1"]`` -> ``{"ot": (0.01, 0.1)}``."""
  grids = {}
  for spec in specs:
    method, _, values = spec.partition("=")
    try:
      grids[method.strip()] = tuple(float(v) for v in values.split(","))
    except ValueError:
      raise ValueError(f"--grid {spec}: write METHOD=V1,V2,... with numbers, "
                       "e.g. --grid ot=0.01,0.1,1.") from None
    if not method.strip() or not values:
      raise ValueError(f"--grid {spec}: write METHOD=V1,V2,...")
    # A repeat would count twice in the grid's size, which sets how far it
    # may extend (runs.bracket): refused, as --values refuses one.
    if len(set(grids[method.strip()])) != len(grids[method.strip()]):
      raise ValueError(f"--grid {spec} repeats a weight.")
    # Records are kept by f"{w:g}" (6 significant digits): two weights must
    # not share one, nor a weight read back differ from the one that ran.
    odd = [w for w in grids[method.strip()] if float(f"{w:g}") != w]
    if odd:
      raise ValueError(f"--grid {spec}: {odd[0]!r} has more than 6 "
                       f"significant digits; write {odd[0]:g}.")
  return grids


def _override_text(value) -> str:
  """A ``--config.key=`` value that config_flags parses back to ``value``:
  a string as it is (a str key's parser keeps quotes), anything else as its
  Python literal."""
  if isinstance(value, config_dict.ConfigDict):
    value = value.to_dict()
  return value if isinstance(value, str) else repr(value)


def config_overrides(flag) -> dict:
  """``{key: value}``: what the ``--config.key=value`` overrides of the
  parsed config flag ``flag`` (curve's ``--config``) set, sorted by key.

  ml_collections applies them in the order typed, so of two keys that share
  a FieldReference (first_regimes.py's ``model.freeze_batchnorm`` is
  ``init_from_teacher``) the later one sets both: the values as typed,
  applied sorted, can build another config. Here each overridden key is at
  its final value in the parsed config, those under an overridden parent
  left out (the parent's final value holds theirs): set in any order, they
  build that config, and two typings of one config give one dict. Copies:
  no config shares them.
  """
  typed = config_flags.get_override_values(flag)
  under = lambda k, p: k.startswith(p + ".") or k.startswith(p + "[")
  keys = sorted(k for k in typed if not any(under(k, p) for p in typed))
  return {k: copy.deepcopy(config_path.get_value(k, flag.value))
          for k in keys}


def _config_path(opts: flags.FlagValues) -> str:
  """``--config`` with its file's path normalised (``./a//b.py:x`` ->
  ``a/b.py:x``; a relative path stays relative), its argument as given."""
  path, colon, arg = opts["config"].config_filename.partition(":")
  return os.path.normpath(path) + colon + arg


def command(opts: flags.FlagValues) -> str:
  """The canonical command line of curve's parsed flags ``opts``.

  ``python -m experiments.curve --config C --key K --values V --seeds N``
  (always), then, in this order: ``--methods`` where given (its order is the
  tables'), ``--focus`` where not ``ot`` (in the order given: it orders
  the tables), ``--grid`` per method given (by method, weights
  ascending), ``--tuning_seeds`` where not 100,101 (in the order given: it
  orders results.md's list and, from 3 seeds, the float sums of the
  choice), ``--extensions`` where not 2, ``--every_weight``
  where given, the ``--config.key=value`` :func:`config_overrides` (by key, each
  at its final value), then ``--out`` and ``--workdir`` (always; its
  default spelt out). The paths of ``--config``, ``--out`` and
  ``--workdir`` normalised; each word quoted for the shell where it needs
  it. Not sys.argv: the same study typed two ways gives one command, and a
  rerun of it gives it again and the same configs.
  """
  path = _config_path(opts)
  words = ["--config", path, "--key", opts.key,
           "--values", ",".join(v.strip() for v in opts.values),
           "--seeds", str(opts.seeds)]
  if opts.methods is not None:
    words += ["--methods", ",".join(opts.methods)]
  if opts.focus != opts["focus"].default:
    words += ["--focus", ",".join(opts.focus)]
  # Curve._grids runs each grid ascending, whatever the order given.
  for method, grid in sorted(parse_grids(opts.grid).items()):
    words += ["--grid", f"{method}={','.join(f'{w:g}' for w in sorted(grid))}"]
  tuning = runs.parse_tuning_seeds(opts.tuning_seeds)
  if tuning != runs.parse_tuning_seeds(opts["tuning_seeds"].default):
    words += ["--tuning_seeds", ",".join(map(str, tuning))]
  if opts.extensions != opts["extensions"].default:
    words += ["--extensions", str(opts.extensions)]
  if opts.every_weight:
    words.append("--every_weight")
  words += [f"--config.{k}={_override_text(v)}"
            for k, v in config_overrides(opts["config"]).items()]
  words += ["--out", os.path.normpath(opts.out), "--workdir",
            os.path.normpath(opts.workdir or default_root("curve", path))]
  return " ".join(["python -m experiments.curve",
                   *map(shlex.quote, words)])


def from_flags(opts: flags.FlagValues) -> Curve:
  """The Curve of curve's parsed flags ``opts`` (main's; a test's reading
  of a recorded command), recording their :func:`command`."""
  path = _config_path(opts)
  if not opts.key:
    raise ValueError("--key is required: the config key the curve varies, "
                     "e.g. --key data.samples_per_class.")
  if not opts.out:
    raise ValueError("--out is required: the directory of the records "
                     "(e.g. docs/regimes/<study>).")
  return Curve(
      runs.load_config_module(path), opts.key, parse_values(opts.values),
      opts.methods, opts.seeds, opts.out,
      opts.workdir or default_root("curve", path),
      config_overrides(opts["config"]),  # What the command rebuilds.
      opts.tuning_seeds, parse_grids(opts.grid),
      opts.extensions, opts.focus, opts.every_weight, command=command(opts))


def main(argv):
  del argv
  quiet_libraries()
  with user_errors():
    curve = from_flags(flags.FLAGS)
    summary = curve.run()
    print(f"\nCurve in {curve.out} ({len(summary['runs'])} table runs):\n")
    print(markdown(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
