"""Tables and figures from the outputs of finished runs.

Inputs, as training writes them::

  results.json            [{"method", "seed", "status",
                            "test_accuracy_best_val", "test_accuracy_last",
                            "val_accuracy_best", "best_step", "step",
                            "hyperparameters", "workdir"}, ...]
  WORKDIR/metrics.jsonl   metric_writers.MetricWriter; train records carry
                          "loss", "accuracy",
                          "matched_fraction/<term>/<s>-><t>", ...
  WORKDIR/analysis.json   {"layers": [...] (depth order),
                           "matched_fraction": [float | null, ...],
                           "plans": {layer: (n_s, n_t) nested lists}}

Accuracies are fractions in [0, 1]; the table shows percent. Figures are drawn
on bare :class:`matplotlib.figure.Figure` objects and saved with the Agg
canvas: no pyplot, so no global backend state and nothing is ever shown.

Across the figures of :func:`write_report`, a method keeps its colour: colour
``C{i}`` goes to the i-th method of the mapping given, drawn or not.
"""

from __future__ import annotations

import os
from typing import (Any, Dict, Iterable, List, Mapping, Optional, Sequence,
                    Tuple)

import numpy as np
from absl import logging
from matplotlib.figure import Figure

from experiments.metric_writers import read_metrics

#: The two reads of a run: test accuracy at the best-validation step, and at
#: the last step. Every table gives both (reproduce's and curve's).
READS = {"test_accuracy_best_val": "best-val step",
         "test_accuracy_last": "last step"}
MATCHED_FRACTION = "matched_fraction/"


class NoDataError(ValueError):
  """A figure has nothing to draw (e.g. no OT metrics in any run)."""


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
  values = np.asarray(values, dtype=np.float64)
  std = values.std(ddof=1) if values.size > 1 else 0.0
  return float(values.mean()), float(std)


def _ordered(methods: Iterable[str],
             methods_order: Optional[Sequence[str]]) -> List[str]:
  """``methods`` (deduplicated), those in ``methods_order`` first."""
  seen = list(dict.fromkeys(methods))
  first = [m for m in methods_order or () if m in seen]
  return first + [m for m in seen if m not in first]


# ---------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------


def summarize(records: Sequence[Mapping[str, Any]],
              methods_order: Optional[Sequence[str]] = None) -> List[dict]:
  """Per-method mean and std over seeds of the test accuracies.

  Args:
    records: ``results.json`` records. Of two records with the same
      ``(method, seed)`` (a re-run), the later one is kept.
    methods_order: methods listed first, in this order; the others follow in
      first-seen order.

  Returns:
    ``[{"method", "seeds", "test_accuracy_best_val_mean",
    "test_accuracy_best_val_std", "test_accuracy_last_mean",
    "test_accuracy_last_std"}, ...]``; std is the sample std (ddof=1), 0 for a
    single seed.
  """
  by_method: Dict[str, Dict[int, Mapping[str, Any]]] = {}
  for record in records:
    runs = by_method.setdefault(record["method"], {})
    if record["seed"] in runs:
      logging.warning("Two results for method %r seed %s; keeping the later.",
                      record["method"], record["seed"])
    runs[record["seed"]] = record
  summary = []
  for method in _ordered(by_method, methods_order):
    runs = list(by_method[method].values())
    row = {"method": method, "seeds": len(runs)}
    for key in READS:
      row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(
          [float(r[key]) for r in runs])
    summary.append(row)
  return summary


def markdown_table(summary: Sequence[Mapping[str, Any]]) -> str:
  """The :func:`summarize` rows as a Markdown table, accuracies in percent."""

  def cell(row, key):
    return (f"{100 * row[key + '_mean']:.2f} ± "
            f"{100 * row[key + '_std']:.2f}")

  lines = [
      "| method | seeds | test acc @ best val (mean ± std) "
      "| test acc @ last (mean ± std) |",
      "|---|---:|---:|---:|",
  ]
  for row in summary:
    cells = [row["method"], str(row["seeds"])]
    cells += [cell(row, key) for key in READS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def mean_se(values: Sequence[float]) -> Tuple[float, float]:
  """Mean and standard error (sample std / sqrt(n); 0 for one value)."""
  mean, std = _mean_std(values)
  return mean, std / float(np.sqrt(len(values)))


def paired(records: Sequence[Mapping[str, Any]], focus: str, other: str,
           key: str = "test_accuracy_best_val"
           ) -> Optional[Tuple[float, float, int, int]]:
  """``focus`` minus ``other`` seed by seed: the one paired difference of
  reproduce's and curve's tables.

  Seeds share their data draw, batches and initialisation, so per-seed
  differences remove most of the between-seed spread.

  Args:
    records: run records (``method``, ``seed``, ``status``, ``key``); only
      finished runs count.
    focus, other: the two methods.
    key: the read (one of :data:`READS`).

  Returns:
    ``(mean, s.e., better, n)`` over the ``n`` seeds both finished, in
    points (percent); ``better``: on how many of them ``focus`` was higher.
    None without a common seed.
  """
  acc = {}
  for r in records:
    if r["status"] == "finished":
      acc.setdefault(r["method"], {})[r["seed"]] = r[key]
  seeds = sorted(set(acc.get(focus, {})) & set(acc.get(other, {})))
  if not seeds:
    return None
  diffs = [100 * (acc[focus][s] - acc[other][s]) for s in seeds]
  mean, se = mean_se(diffs)
  return mean, se, sum(d > 0 for d in diffs), len(seeds)


def paired_cells(pairs: Sequence[Tuple[float, float, int, int]]) -> str:
  """:func:`paired`'s results at both reads as table cells:
  ``mean | s.e. | k/n | mean | s.e. | k/n``."""
  return " | ".join(f"{p[0]:+.2f} | {p[1]:.2f} | {p[2]}/{p[3]}" for p in pairs)


def paired_header(first: str) -> List[str]:
  """The header lines of a table of :func:`paired_cells` rows, ``first``
  naming its first column (the pair)."""
  return [f"| {first} | n | best val: mean | s.e. | better | last: mean | "
          "s.e. | better |", "|---|---:|---:|---:|---:|---:|---:|---:|"]


def paired_rows(records: Sequence[Mapping[str, Any]],
                pairs: Sequence[Tuple[str, str, str]]) -> List[str]:
  """One Markdown row ``| name | n | mean | s.e. | better | ... |`` per
  ``(focus, other, name)`` of ``pairs``: ``focus`` minus ``other`` seed by
  seed at both reads (:data:`READS`, :func:`paired`, :func:`paired_cells`),
  ``n`` their common finished seeds. A pair without one has no row."""
  rows = []
  for focus, other, name in pairs:
    cells = [paired(records, focus, other, read) for read in READS]
    if all(cells):
      rows.append(f"| {name} | {cells[0][3]} | {paired_cells(cells)} |")
  return rows


def paired_table(records: Sequence[Mapping[str, Any]], baseline: str,
                 methods_order: Optional[Sequence[str]] = None,
                 contrasts: Sequence[Tuple[str, str]] = ()) -> str:
  """Each method minus ``baseline`` on the same seeds, at both reads
  (:data:`READS`), as a Markdown table: per method the number of common
  finished seeds, then at each read the mean and standard error of the
  per-seed differences (:func:`paired`, points) and on how many seeds the
  method was better (:func:`paired_rows`). Then a second table, ``focus -
  other`` for each ``(focus, other)`` of ``contrasts`` that has common
  finished seeds (e.g. Omega_P against its controls); none if no pair
  has. Empty when the baseline is absent."""
  methods = _ordered([r["method"] for r in records], methods_order)
  if baseline not in methods:
    return ""
  rows = paired_rows(records, [(m, baseline, m) for m in methods
                               if m != baseline])
  second = paired_rows(records, [(f, o, f"{f} − {o}") for f, o in contrasts])
  return "\n".join([
      "Paired differences (same seeds, points): mean, standard error, seeds "
      "on which the method was better; at the best-validation step and at "
      "the last step.", "",
      *paired_header(f"method − {baseline} (same seeds)"), *rows,
      *(["", *paired_header("pair (same seeds)"), *second] if second
        else [])]) + "\n"


# ---------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------


def mean_curve(
    runs_records: Sequence[Sequence[Mapping[str, Any]]], key: str
) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Mean and std over runs of ``key`` at each step.

  Args:
    runs_records: per run (seed), its records of one split
      (:func:`experiments.metric_writers.read_metrics`).
    key: the metric.

  Returns:
    ``(steps, mean, std)``, each ``(n_steps,)``, over the union of the steps
    at which some run logged a finite ``key``; each step averages the runs
    that logged it (sample std, 0 for one run). None if no run has ``key``.
  """
  per_step: Dict[int, List[float]] = {}
  for records in runs_records:
    for record in records:
      value = record.get(key)
      if value is not None and np.isfinite(value):
        per_step.setdefault(int(record["step"]), []).append(float(value))
  if not per_step:
    return None
  steps = sorted(per_step)
  stats = np.array([_mean_std(per_step[s]) for s in steps])
  return np.array(steps), stats[:, 0], stats[:, 1]


def _plot_band(ax, curve, color: str, label: str) -> None:
  steps, mean, std = curve
  ax.plot(steps, mean, color=color, label=label)
  ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2,
                  linewidth=0)


def _save(fig: Figure, path: str) -> None:
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(path, dpi=120)


def plot_learning_curves(runs: Mapping[str, Sequence[str]], path: str,
                         split: str = "val", key: str = "accuracy") -> None:
  """Evaluation curve (left) and train loss (right), mean ± std over seeds.

  Args:
    runs: method -> the workdirs of its seeds.
    path: the PNG to write.
    split: the split of the left panel.
    key: the metric of the left panel.

  Raises:
    NoDataError: no run logged either curve.
  """
  fig = Figure(figsize=(11, 4), layout="constrained")
  ax_eval, ax_loss = fig.subplots(1, 2)
  drawn = False
  for i, (method, workdirs) in enumerate(runs.items()):
    if not workdirs:
      continue
    records = [read_metrics(w) for w in workdirs]
    label = f"{method} (n={len(workdirs)})"
    for ax, curve_split, curve_key in ((ax_eval, split, key),
                                       (ax_loss, "train", "loss")):
      curve = mean_curve(
          [[r for r in rs if r["split"] == curve_split] for rs in records],
          curve_key)
      if curve is not None:
        _plot_band(ax, curve, f"C{i % 10}", label)
        drawn = True
  if not drawn:
    raise NoDataError(f"no run logged {split}/{key} or train/loss.")
  for ax, title in ((ax_eval, f"{split} {key}"), (ax_loss, "train loss")):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend()
  _save(fig, path)


def plot_matched_fraction_training(runs: Mapping[str, Sequence[str]],
                                   path: str,
                                   layer_key: Optional[str] = None) -> None:
  """Matched fraction along training (paper Fig. 3), mean ± std over seeds.

  Args:
    runs: method -> the workdirs of its seeds.
    path: the PNG to write.
    layer_key: the term and layer pair, with or without the
      ``matched_fraction/`` prefix (e.g. ``"ot/stage2->stage2"``); None: one
      panel per pair logged.

  Raises:
    NoDataError: no run logged a matched fraction (of ``layer_key``).
  """
  records = {method: [read_metrics(w, split="train") for w in workdirs]
             for method, workdirs in runs.items()}
  if layer_key is None:
    keys = list(dict.fromkeys(
        k for runs_records in records.values() for rs in runs_records
        for r in rs for k in r if k.startswith(MATCHED_FRACTION)))
  elif layer_key.startswith(MATCHED_FRACTION):
    keys = [layer_key]
  else:
    keys = [MATCHED_FRACTION + layer_key]
  curves = {(method, key): mean_curve(runs_records, key)
            for method, runs_records in records.items() for key in keys}
  if all(curve is None for curve in curves.values()):
    raise NoDataError(f"no run logged {keys or MATCHED_FRACTION + '*'}.")
  fig = Figure(figsize=(4.5 * len(keys), 4), layout="constrained")
  axes = fig.subplots(1, len(keys), squeeze=False, sharey=True)[0]
  for ax, key in zip(axes, keys):
    for i, (method, runs_records) in enumerate(records.items()):
      curve = curves[method, key]
      if curve is not None:
        _plot_band(ax, curve, f"C{i % 10}",
                   f"{method} (n={len(runs_records)})")
    ax.set_title(key[len(MATCHED_FRACTION):])
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend()
  axes[0].set_ylabel("matched fraction (train batch)")
  _save(fig, path)


# ---------------------------------------------------------------------------
# Analysis: matched fraction by depth, OT plans
# ---------------------------------------------------------------------------


def plot_matched_fraction_depth(
    analysis_by_method: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str) -> None:
  """Matched fraction against layer depth (paper Fig. 2).

  Args:
    analysis_by_method: method -> one ``analysis.json`` dict per seed. Layers
      are placed in the order of the first analysis listing them; ``null``
      values (unequal widths) are left out.
    path: the PNG to write.

  Raises:
    NoDataError: no analysis has a matched fraction.
  """
  layers = list(dict.fromkeys(
      layer for analyses in analysis_by_method.values() for a in analyses
      for layer in a["layers"]))
  points = {}
  for method, analyses in analysis_by_method.items():
    xs, stats = [], []
    for x, layer in enumerate(layers):
      values = [a["matched_fraction"][a["layers"].index(layer)]
                for a in analyses if layer in a["layers"]]
      values = [v for v in values if v is not None and np.isfinite(v)]
      if values:
        xs.append(x)
        stats.append(_mean_std(values))
    if xs:
      points[method] = (np.array(xs, dtype=float), np.array(stats),
                        len(analyses))
  if not points:
    raise NoDataError("no analysis has a matched fraction.")
  fig = Figure(figsize=(max(5.0, 1.0 + 0.8 * len(layers)), 4),
               layout="constrained")
  ax = fig.subplots()
  # Small horizontal offsets keep the error bars of methods apart.
  offsets = np.linspace(-0.1, 0.1, len(points)) if len(points) > 1 else [0.0]
  for offset, (i, method) in zip(
      offsets,
      [(i, m) for i, m in enumerate(analysis_by_method) if m in points]):
    xs, stats, n = points[method]
    ax.errorbar(xs + offset, stats[:, 0], yerr=stats[:, 1], marker="o",
                capsize=3, color=f"C{i % 10}", label=f"{method} (n={n})")
  ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
  ax.set_xlabel("layer (input → output)")
  ax.set_ylabel("matched fraction (trace of the OT plan)")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, path)


def scaled_plan(plan, sort_rows: bool = True) -> np.ndarray:
  """The plan as drawn: ``n_s * plan``, rows optionally sorted by argmax.

  With the uniform student marginal each row then sums to 1 (the share of a
  student neuron's mass sent to each teacher neuron), and a permutation plan
  is all 0s and 1s. Sorting rows by their argmax column lays a matching out
  along the diagonal.

  Args:
    plan: ``(n_s, n_t)`` transport plan.
    sort_rows: reorder the rows (student neurons) by argmax column.

  Returns:
    ``(n_s, n_t)`` float64 array.
  """
  plan = np.asarray(plan, dtype=np.float64)
  if plan.ndim != 2:
    raise ValueError(f"plan must be (n_s, n_t); got shape {plan.shape}.")
  scaled = plan.shape[0] * plan
  if sort_rows:
    scaled = scaled[np.argsort(plan.argmax(axis=1), kind="stable")]
  return scaled


def plot_plan(plan, path: str, title: str = "OT plan",
              sort_rows: bool = True) -> None:
  """Heatmap of an OT plan: rows student neurons, columns teacher neurons.

  Args:
    plan: ``(n_s, n_t)`` transport plan (array or nested lists).
    path: the PNG to write.
    title: the figure title; "(rows sorted by argmax)" is appended when
      ``sort_rows``.
    sort_rows: see :func:`scaled_plan`.
  """
  image = scaled_plan(plan, sort_rows)
  n_s, n_t = image.shape
  fig = Figure(figsize=(6, 5), layout="constrained")
  ax = fig.subplots()
  im = ax.imshow(image, cmap="viridis", vmin=0.0, aspect="auto",
                 interpolation="nearest")
  fig.colorbar(im, ax=ax, label=f"{n_s} × plan (row sums 1)")
  ax.set_title(title + (" (rows sorted by argmax)" if sort_rows else ""))
  ax.set_xlabel(f"teacher neuron (n_t={n_t})")
  ax.set_ylabel(f"student neuron (n_s={n_s})")
  _save(fig, path)


def _pick_plan(analyses: Mapping[str, Sequence[Mapping[str, Any]]]
               ) -> Optional[Tuple[str, str, Any]]:
  """``(method, layer, plan)``: the deepest plan of the first seed of "ot",
  else of the first method whose first seed has plans."""
  for method in _ordered(["ot", *analyses], None):
    seeds = analyses.get(method) or ()
    plans = seeds[0].get("plans") if seeds else None
    if plans:
      depth_order = [name for name in seeds[0]["layers"] if name in plans]
      layer = (depth_order or list(plans))[-1]
      return method, layer, plans[layer]
  return None


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def write_report(out_dir: str, records: Sequence[Mapping[str, Any]],
                 runs: Mapping[str, Sequence[str]],
                 analyses: Mapping[str, Sequence[Mapping[str, Any]]],
                 methods_order: Optional[Sequence[str]] = None,
                 baseline: Optional[str] = None,
                 contrasts: Sequence[Tuple[str, str]] = (),
                 figures: str = "draw") -> str:
  """Writes ``results.md`` and the figures into ``out_dir``.

  Figures: ``learning_curves.png``, ``matched_fraction_depth.png``,
  ``matched_fraction_training.png``, ``ot_plan.png``; one whose data is absent
  (e.g. no OT metrics) is skipped with a logged note.

  Args:
    out_dir: the output directory (created).
    records: ``results.json`` records.
    runs: method -> the workdirs of its seeds.
    analyses: method -> the ``analysis.json`` dicts of its seeds.
    methods_order: table rows and colours in this order (see
      :func:`summarize`).
    baseline: a method to compare every other one with, seed by seed
      (:func:`paired_table`); None: no paired table.
    contrasts: ``(focus, other)`` pairs, each ``focus - other`` in the
      paired table's second table (:func:`paired_table`).
    figures: ``"draw"``: from ``runs`` and ``analyses``; where they are not
      every record's (records kept without their runs' workdirs), no figure
      is drawn: ``"keep"`` links those already in ``out_dir`` (drawn by the
      runs that made the records), ``"skip"`` links none.

  Returns:
    The Markdown table(s).
  """
  if figures not in ("draw", "keep", "skip"):
    raise ValueError(f"figures={figures!r}: draw, keep or skip.")
  os.makedirs(out_dir, exist_ok=True)
  table = markdown_table(summarize(records, methods_order))
  if baseline:
    paired = paired_table(records, baseline, methods_order, contrasts)
    table += "\n" + paired if paired else ""
  methods = _ordered(
      [r["method"] for r in records] + list(runs) + list(analyses),
      methods_order)
  # Same methods, same order in every figure: a method keeps its colour.
  runs = {m: list(runs.get(m, ())) for m in methods}
  analyses = {m: list(analyses.get(m, ())) for m in methods}

  def ot_plan(path):
    picked = _pick_plan(analyses)
    if picked is None:
      raise NoDataError("no analysis has plans.")
    method, layer, plan = picked
    plot_plan(plan, path, title=f"OT plan, {method}, {layer}")

  drawers = {
      "learning_curves.png": lambda p: plot_learning_curves(runs, p),
      "matched_fraction_depth.png":
          lambda p: plot_matched_fraction_depth(analyses, p),
      "matched_fraction_training.png":
          lambda p: plot_matched_fraction_training(runs, p),
      "ot_plan.png": ot_plan,
  }
  written = []
  for name, draw in drawers.items():
    if figures != "draw":
      if figures == "keep" and os.path.exists(os.path.join(out_dir, name)):
        written.append(name)
      continue
    try:
      draw(os.path.join(out_dir, name))
      written.append(name)
    except NoDataError as e:
      logging.info("report: skipping %s: %s", name, e)
  markdown = "# Results\n\n" + table + "".join(
      f"\n![{os.path.splitext(name)[0]}]({name})\n" for name in written)
  with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  return table
