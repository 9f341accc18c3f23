"""Train a config, make a record: what reproduce, sweep and curve share.

The three tools differ in what they vary and what they tabulate, not in how
they run one config:

* **Config files** (:func:`load_config_module`,
  :func:`method_configs`, :func:`seeded`, :func:`has_key`, :func:`flatten`,
  :func:`hyperparameters`, :func:`check_initialisation`,
  :func:`same_network`): a config file
  ``file.py[:ARG]`` as its methods' configs, the command line's
  ``--config.key=value`` overrides applied last, a method's config for one
  seed, and the seeds it must not run with.
* **The record of a run** (:class:`Record`, :func:`run_record`,
  :class:`Planned`, :func:`recorded`, :func:`write_json`):
  ``experiments.loop.train_and_evaluate`` in a workdir (finished runs are
  reused, interrupted ones resume), a run that diverges recorded as such,
  never hidden, and the plan diagnostics of its ``analysis.json``
  (:data:`PLAN_MEASURES`); a record kept in a file is reused when it is the
  run asked for.
* **Choosing on validation** (:func:`tune`, :class:`Tuning`,
  :func:`bracket`, :func:`mean_or_none`, :func:`require_validation`,
  :func:`parse_tuning_seeds`): the one
  way to run a weight grid (curve's choice at each value, sweep's): a weight
  is chosen on the validation accuracy at the best step, averaged over the
  tuning seeds; test accuracy chooses nothing.

Whether a saved record or checkpoint is the run a command asks for is
:mod:`experiments.same_run`'s rule.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
import types
from typing import (Any, Callable, Mapping, NamedTuple, Optional, Sequence,
                    TypedDict)

import jax
import numpy as np
from absl import logging

from experiments import loop, same_run
from experiments.configs import common
from ot_transfer_jax import checkpoint, models

# ---------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------


def load_config_module(path: str) -> types.SimpleNamespace:
  """The config file ``path`` (``file.py[:ARG]``), as the tools read it.

  Raises:
    ValueError: the file has no ``get_methods``, or it returns no method.

  Returns:
    A namespace with ``methods`` (the suite: the names of the file's
    ``get_methods(ARG)``, in the order of the results), ``baseline`` (the
    first of them, which reproduce compares every other with),
    ``get_config(method=None)`` (the file's ``get_config``
    with ``ARG``'s other settings, e.g. ``data=...``, kept and the method
    set), ``SWEEP`` (``{method: (config_key, (value, ...))}``: the file's
    ``SWEEP``, or ``get_sweep(ARG)`` in a file that takes arguments; None
    without either), ``applies`` (the file's ``applies(method, config) ->
    bool``, see experiments.curve; None if absent), ``inherited`` (the
    file's ``get_inherited(ARG)``: ``{method: {config key: other method}}``,
    the key set to the weight experiments.curve chose for the other method;
    None if absent) and ``__doc__``.
  """
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_reproduced_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = (module.get_sweep(arg or None) if hasattr(module, "get_sweep")
           else getattr(module, "SWEEP", None))
  if not hasattr(module, "get_methods"):
    raise ValueError(f"{path} has no get_methods(arg=None) -> {{method: "
                     "Method}: see experiments/configs/common.py.")
  methods = tuple(module.get_methods(arg or None))
  if not methods:
    raise ValueError(f"{path}: get_methods({arg or None!r}) returns no "
                     "method; the first it returns is the baseline.")
  return types.SimpleNamespace(
      __doc__=module.__doc__, methods=methods, baseline=methods[0],
      SWEEP=sweep,
      applies=getattr(module, "applies", None),
      inherited=(module.get_inherited(arg or None)
                 if hasattr(module, "get_inherited") else None),
      get_config=lambda method=None: module.get_config(
          common.with_method(arg, method)))


def known_methods(module, methods: Optional[Sequence[str]]) -> list:
  """``methods`` (default: every method of the config, in its order).

  Raises:
    ValueError: a method the config does not define, listing those it does.
  """
  known = list(module.methods)
  methods = list(methods or known)
  unknown = [m for m in methods if m not in known]
  if unknown:
    raise ValueError(f"Unknown methods {unknown}; this config defines "
                     f"{known}.")
  return methods


def method_configs(module, methods, overrides: Mapping[str, Any]) -> dict:
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
          {k: v for k, v in overrides.items() if has_key(cfg, k)})
    out[method] = cfg
  return out


#: ``{"a.b": leaf}`` of a nested dict (a JSON config): the keys
#: :mod:`experiments.same_run` compares.
flatten = same_run.flatten


def has_key(cfg, dotted: str) -> bool:
  """Whether the config (or nested dict) ``cfg`` has the key ``a.b.c``."""
  node = cfg
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def seeded(config, seed: int, root: str):
  """A copy of ``config`` for ``seed``: ``config.seed`` and, unless
  ``vary_data_seed`` is False, ``data.seed`` (a new data draw and validation
  split per seed; for one seed every method sees the same data, batches and
  initialisation); a teacher the config trains goes to ``ROOT/teacher``
  (unless ``teacher.workdir`` says where)."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.seed = seed
    if cfg.vary_data_seed:
      cfg.data.seed = seed
    if cfg.teacher.source == "train" and not cfg.teacher.workdir:
      cfg.teacher.workdir = os.path.join(root, "teacher")
  return cfg


def check_initialisation(config, seeds: Sequence[int], what: str) -> None:
  """Refuses a student that would start from its teacher's initial weights.

  A student from random weights (not ``init_from_teacher``) of its trained
  teacher's architecture, run with ``config.seed`` equal to
  ``teacher.job.seed``, is initialised with the very weights the teacher
  started from: it would share the teacher's random features, and its
  "scratch" would not be one. reproduce, sweep and curve call this before
  any run, with the seeds of the runs they have left to train (a run
  already recorded is not refused: a rerun of a committed table trains
  nothing).

  Args:
    config: a method's config (before :func:`seeded`).
    seeds: the student seeds (``config.seed``) still to train.
    what: names the runs in the error (``"scratch"``, ``"ot at K=10"``).

  Raises:
    ValueError: one of ``seeds`` is the teacher's, naming the fix.
  """
  t = config.teacher
  if t.source != "train" or config.init_from_teacher:
    return
  if t.job.seed not in seeds or not same_network(config):
    return
  raise ValueError(
      f"{what}: seed {t.job.seed} would initialise the student with the "
      "teacher's own initial weights (same architecture, teacher.job.seed). "
      f"Give the teacher another seed (--config.teacher.job.seed="
      f"{common.TEACHER_SEED} and a new teacher.workdir).")


def same_network(config) -> bool:
  """Whether the student's network is its trained teacher's
  (``teacher.job.model``): modules compare their fields, defaults filled in
  (no width and width=1.0 are one small_cnn); the head's size does not
  matter."""
  t = config.teacher.job.model
  return models.create_model(config.model.name, 1, **config.model.kwargs) == (
      models.create_model(t.name, 1, **t.kwargs))


def hyperparameters(config) -> dict:
  """The weights a run used, by config key: each loss term's weight, weight
  decay and head decay (what a sweep chooses per method)."""
  out = {f"loss.terms.{name}.weight": term.weight
         for name, term in config.loss.terms.items()}
  out["loss.weight_decay"] = config.loss.weight_decay
  out["loss.head_decay"] = config.loss.head_decay
  return out


# ---------------------------------------------------------------------------
# The record of a run
# ---------------------------------------------------------------------------

#: Per-layer plan diagnostics of a run's analysis (experiments.analysis),
#: copied into its record.
PLAN_MEASURES = {
    "matched_fraction": "trace of the plan (1 = the identity matching)",
    "row_max_mass": "row-max mass, sum_j max_k P_jk (1 = one-to-one under "
                    "any permutation, at most n_s/n_t for a narrower "
                    "student; 1/n_t = uniform)",
    "plan_entropy": "normalised plan entropy (0 = one-to-one, 1 = uniform)",
}


class Record(TypedDict, total=False):
  """One run, as JSON: what every tool writes (a subset in sweep.json).

  Set by the tool (``run_record``'s ``base``), in this order:

  * ``kind``: curve: ``"run"`` (a table run), ``"tuning"`` (a grid point)
    or ``"every_weight"`` (a run of ``--every_weight``'s block: a table seed
    at a weight of the grid, ``weight``, or of the baseline, ``weight``
    None);
  * ``key``, ``value``: the setting a curve varies and its value (a sweep:
    the key it sweeps and the value of this grid point); ``label``: curve:
    the value's directory name (``samples_per_class=10``);
  * ``method``: the config's method; ``seed``: ``config.seed`` (a tuning
    seed for a tuning run);
  * ``weights``: curve: :func:`hyperparameters`; ``hyperparameters``:
    reproduce's name for the same (the committed results.json files have it);
  * ``workdir``: reproduce and sweep: the run's experiments.main workdir.

  Set by :func:`run_record`:

  * ``status``: ``"finished"`` or ``"diverged"`` (curve's results.json also
    lists a method that does not apply at a value as ``"skipped"``, with
    ``skipped: True``);
  * ``test_accuracy_best_val``: test accuracy at the best-validation step;
    ``test_accuracy_last``: at the last step; ``val_accuracy_best``: the
    best validation accuracy; ``best_step``, ``step``: the best-validation
    and the last step (all None when diverged; the best-* None without a
    validation split);
  * one entry per :data:`PLAN_MEASURES` name: ``{layer: float or None}``
    after training (``{}`` when diverged);
  * ``wall_s``: seconds the call that made the record took;
  * ``config``: the run's config as JSON (committed curve records keep it;
    tables leave it out).
  """

  kind: str
  key: str
  value: Any
  label: str
  method: str
  seed: Optional[int]
  weights: dict
  weight: Optional[float]
  hyperparameters: dict
  workdir: str
  status: str
  skipped: bool
  test_accuracy_best_val: Optional[float]
  test_accuracy_last: Optional[float]
  val_accuracy_best: Optional[float]
  best_step: Optional[int]
  step: Optional[int]
  matched_fraction: dict
  row_max_mass: dict
  plan_entropy: dict
  wall_s: float
  config: dict


def run_record(config, workdir: str, /, **base) -> Record:
  """Trains ``config`` in ``workdir`` (or reuses / resumes the run there)
  and returns its :class:`Record`: ``base`` first (it may hold a
  ``workdir`` field), then the outcome.

  A run that diverges (``loop.Diverged``) is logged and recorded with status
  ``"diverged"``; every other exception propagates (a preempted run resumes
  when the command is rerun).
  """
  start = time.time()
  try:
    # Strict: a checkpoint of the same run resumes, one made with other
    # (even resumable) settings is refused, since the record names config.
    final = loop.train_and_evaluate(config, workdir, strict=True)
  except loop.Diverged as e:  # Recorded, never hidden nor chosen.
    logging.error("%s diverged: %s", workdir, e)
    record = {**base, "status": "diverged", "test_accuracy_best_val": None,
              "test_accuracy_last": None, "val_accuracy_best": None,
              "best_step": None, "step": None,
              **{measure: {} for measure in PLAN_MEASURES}}
  else:
    record = {**base, "status": "finished",
              "test_accuracy_best_val": final["test_accuracy_at_best_val"],
              "test_accuracy_last": final["test_accuracy"],
              "val_accuracy_best": final["best_val_accuracy"],
              "best_step": final["best_step"], "step": final["step"],
              **plan_measures(workdir)}
  record["wall_s"] = round(time.time() - start, 1)
  record["config"] = checkpoint.config_to_json(config)
  return record


class Planned(NamedTuple):
  """A run to record (:func:`recorded`)."""

  config: Any  # The run's config (seeded: runs.seeded).
  workdir: str  # Its experiments.main workdir.
  # The JSON file that keeps its record, with its config (the committed
  # records of curve, reproduce and sweep); None: the workdir alone keeps
  # the run (run_record reuses a finished one).
  path: Optional[str]
  base: dict  # The record's leading fields (run_record's base).


def recorded(run: Planned,
             train: Optional[Callable[[Planned], Record]] = None) -> Record:
  """``run``'s record: the one at ``run.path`` if there is one (refused if
  made with other settings, :func:`load_record`), else ``train(run)``
  (default :func:`train_record`)."""
  return load_record(run.path, run.config) or (train or train_record)(run)


def left_to_train(run: Planned) -> bool:
  """Whether ``run`` would train: no record at ``run.path`` and no finished
  run in its workdir (which :func:`run_record` reuses)."""
  return not ((run.path and os.path.exists(run.path))
              or loop.is_finished(run.workdir))


def train_record(run: Planned) -> Record:
  """:func:`run_record` of ``run``, written to ``run.path`` (if any; by
  process 0, which alone has the plan diagnostics)."""
  record = run_record(run.config, run.workdir, **run.base)
  if run.path and jax.process_index() == 0:
    write_json(run.path, record, indent=1)
  return record


def load_record(path: Optional[str], config) -> Optional[Record]:
  """The record at ``path`` if there is one (None without).

  Raises:
    ValueError: the record is another result than a run of ``config``
      (:func:`experiments.same_run.record_differences`), naming the
      differences.
  """
  if not path or not os.path.exists(path):
    return None
  record = read_json(path)
  diff = same_run.record_differences(record["config"],
                                     checkpoint.config_to_json(config))
  if diff:
    raise ValueError(
        f"{path} was made with other settings than this command builds: "
        f"{'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''}. Rerun "
        "the command that made it, or pass another --out for this one.")
  return record


def plan_measures(workdir: str) -> dict:
  """``{measure: {layer: value}}`` of :data:`PLAN_MEASURES` from a finished
  run's ``analysis.json`` (which process 0 writes; ``{}`` each elsewhere)."""
  if jax.process_index() != 0:
    return {measure: {} for measure in PLAN_MEASURES}
  analysis = read_json(os.path.join(workdir, loop.ANALYSIS))
  return {measure: dict(zip(analysis["layers"], analysis[measure]))
          for measure in PLAN_MEASURES}


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


# One atomic JSON writer for the records and the runs' outputs.
write_json = loop.write_json


# ---------------------------------------------------------------------------
# Choosing on validation
# ---------------------------------------------------------------------------


def require_validation(config) -> None:
  """Raises ValueError when ``config`` has no validation split to choose on."""
  if config.data.val_per_class is None and config.data.val_fraction is None:
    raise ValueError("Weights are chosen on the validation split, but this "
                     "config has none: set data.val_per_class.")


def parse_tuning_seeds(seeds: Sequence[Any],
                       table_seeds: Optional[int] = None) -> list:
  """``--tuning_seeds`` (curve's and sweep's flag) as ints: ``["100",
  "101"]`` -> ``[100, 101]``.

  Args:
    seeds: the flag's strings (or ints).
    table_seeds: the table's seeds are ``0 .. table_seeds-1``, none of which
      may tune (curve); None where the tool cannot know them (sweep: the
      table is another command's).

  Raises:
    ValueError: no seed, one that is not an integer, a repeated one, or a
      table seed, naming the fix.
  """
  given = ",".join(str(s) for s in seeds)
  try:
    # Through str: a float such as 100.5 is refused, not truncated.
    out = [int(str(s).strip()) for s in seeds]
  except ValueError:
    raise ValueError(f"--tuning_seeds {given}: seeds are integers, e.g. "
                     "--tuning_seeds 100,101.") from None
  if any(t < 0 for t in out):
    raise ValueError(f"--tuning_seeds {given}: seeds are non-negative "
                     "integers, e.g. --tuning_seeds 100,101.")
  if not out or len(set(out)) != len(out):
    raise ValueError(f"--tuning_seeds {given}: give one or more distinct "
                     "seeds, e.g. --tuning_seeds 100,101.")
  clash = [t for t in out if t < (table_seeds or 0)]
  if clash:
    first = max(100, table_seeds)
    raise ValueError(
        f"--tuning_seeds {clash[0]} is one of the table's seeds 0 .. "
        f"{table_seeds - 1}: weights must be chosen on seeds no table uses. "
        f"Pass --tuning_seeds {first},{first + 1}.")
  return out


@dataclasses.dataclass(frozen=True)
class Tuning:
  """One method's weight grid at one setting, on the tuning seeds (:func:`tune`).

  Attributes:
    key: the config key the grid sets (``loss.terms.ot.weight``).
    weight: the chosen weight (:func:`bracket`; None if every run diverged).
    grid: ``{weight: mean validation accuracy over the tuning seeds}``
      (None where one diverged), in the order the weights ran.
    test: the same for the test accuracy at the best-validation step (for
      reading; it chooses nothing).
    records: ``{weight: [Record per tuning seed]}``.
    note: "" when the grid brackets the choice, else why it does not.
  """

  key: str
  weight: Optional[float]
  grid: dict
  test: dict
  records: dict
  note: str


def tune(point: Callable[[float, int], Planned], key: str,
         grid: Sequence[float], seeds: Sequence[int], extensions: int = 0,
         train: Optional[Callable[[Planned], Record]] = None) -> Tuning:
  """Runs (or reuses) a method's weight grid and chooses on validation: the
  one way to run a weight grid (experiments.curve at each value,
  experiments.sweep at its one setting).

  Args:
    point: ``point(weight, seed)`` is the run of ``weight`` on tuning seed
      ``seed`` (its config must have a validation split); its record is
      :func:`recorded` (reused if kept, else trained by ``train``).
    key: the config key the grid sets.
    grid: the weights, run in this order.
    seeds: the tuning seeds; a weight's accuracy is their mean.
    extensions: how often the grid may grow 10x past an edge best
      (:func:`bracket`; 0: never; curve's and sweep's ``--extensions``).
    train: trains a run without a kept record (default :func:`train_record`).
  """
  points, tests, records = {}, {}, {}
  weights, chosen, note = list(grid), None, "an empty grid"
  while weights:
    w = weights.pop(0)
    records[w] = []
    for seed in seeds:
      run = point(w, seed)
      require_validation(run.config)
      records[w].append(recorded(run, train))
    points[w] = mean_or_none([r["val_accuracy_best"] for r in records[w]])
    tests[w] = mean_or_none([r["test_accuracy_best_val"] for r in records[w]])
    if not weights:
      chosen, nxt, note = bracket(points, len(grid), extensions)
      if nxt is not None:
        weights.append(nxt)
  return Tuning(key, chosen, points, tests, records, note)


def mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
  """The mean of a grid point's accuracies over the tuning seeds; None when
  one of them is None (a diverged run: the point is never chosen)."""
  if not values or any(v is None for v in values):
    return None
  return float(np.mean(values))


def bracket(points: Mapping[float, Optional[float]], base: int,
            extensions: int):
  """The weight to choose and, if the grid must grow, the next one to try.

  Args:
    points: ``{weight: validation accuracy (the tuning seeds' mean) or None
      (diverged)}``.
    base: how many of the weights are the original grid (the rest are
      extensions).
    extensions: how many extensions are allowed in all (0: none, as the
      committed sweeps; experiments.sweep re-derives a choice and its note
      over sweep.json's records with 0, the points past ``base`` counted as
      extensions already made).

  Returns:
    ``(chosen, next_weight, note)``: ``chosen`` is the weight of best
    validation accuracy (of equals, one strictly inside the grid if any, else
    the smallest; None if every run diverged); ``next_weight`` is 10x past
    the edge ``chosen`` is at, while extensions are left (else None);
    ``note`` is "" when the grid brackets ``chosen``, else why it does not.
  """
  weights = sorted(points)
  finite = [w for w in weights if points[w] is not None]
  if not finite:
    return None, None, "every run diverged"
  best = max(points[w] for w in finite)
  tied = [w for w in finite if points[w] == best]
  inside = [w for w in tied if weights[0] < w < weights[-1]]
  if inside:
    return inside[0], None, ""
  chosen = tied[0]
  if len(weights) == 1:
    return chosen, None, "a grid of one value brackets nothing"
  step = 0.1 if chosen == weights[0] else 10.0
  if len(weights) - base < extensions:
    return chosen, float(f"{chosen * step:.6g}"), ""
  edge = "smallest" if step < 1 else "largest"
  return chosen, None, (f"best at the {edge} weight after "
                        f"{len(weights) - base} extension(s): not bracketed")
