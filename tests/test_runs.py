"""experiments.runs: the record of a run, choosing on validation, config helpers.

Fast: training is replaced by a stub that returns final metrics and writes an
``analysis.json`` (the end-to-end tools are tested in test_curve.py,
test_experiment.py and test_fashion_mnist_configs.py).
"""

import glob
import json
import os

import pytest

from digits_job import REPO, tiny_config
from experiments import loop, runs, sweep

DIGITS = runs.load_config_module(
    os.path.join(REPO, "experiments/configs/transfer.py:data=digits"))


# --- The weight grid ---------------------------------------------------------


def test_bracket_keeps_an_interior_best_without_extending():
  assert runs.bracket({0.01: 0.5, 0.1: 0.7, 1.0: 0.6}, 3, 2) == (0.1, None,
                                                                  "")


def test_bracket_extends_ten_times_past_the_edge_of_the_best():
  assert runs.bracket({0.01: 0.7, 0.1: 0.6, 1.0: 0.5}, 3, 2)[:2] == (0.01,
                                                                     0.001)
  assert runs.bracket({0.01: 0.5, 0.1: 0.6, 1.0: 0.7}, 3, 2)[:2] == (1.0,
                                                                     10.0)


def test_bracket_stops_after_the_allowed_extensions_and_says_so():
  points = {1e-4: 0.8, 1e-3: 0.7, 0.01: 0.6, 0.1: 0.5, 1.0: 0.4}
  chosen, nxt, note = runs.bracket(points, base=3, extensions=2)
  assert (chosen, nxt) == (1e-4, None)
  assert "not bracketed" in note and "smallest" in note
  # A sweep allows none: an edge best is chosen, and said to be one.
  assert runs.bracket({0.01: 0.7, 0.1: 0.6}, base=2, extensions=0) == (
      0.01, None, "best at the smallest weight after 0 extension(s): not "
      "bracketed")


def test_bracket_prefers_an_interior_value_among_equals():
  assert runs.bracket({0.01: 0.7, 0.1: 0.7, 1.0: 0.5}, 3, 2)[:2] == (0.1,
                                                                     None)


def test_bracket_never_chooses_a_diverged_run():
  # The diverged largest weight counts as worse: 0.1 is bracketed.
  assert runs.bracket({0.01: 0.5, 0.1: 0.6, 1.0: None}, 3, 2)[:2] == (0.1,
                                                                     None)
  assert runs.bracket({0.1: None}, 1, 2)[0] is None


def test_a_grid_point_is_the_mean_over_tuning_seeds_none_if_one_diverged():
  assert runs.mean_or_none([0.5, 0.7]) == pytest.approx(0.6)
  assert runs.mean_or_none([0.5, None]) is None


def _committed_sweeps() -> dict:
  """``{path: sweep.json content}`` of every sweep output under docs/."""
  out = {}
  for path in glob.glob(os.path.join(REPO, "docs", "**", "*.json"),
                        recursive=True):
    if os.sep + "regimes" + os.sep in path:
      continue  # Curve records.
    with open(path) as f:
      saved = json.load(f)
    if isinstance(saved, dict) and {"records", "chosen"} <= set(saved):
      out[os.path.relpath(path, REPO)] = saved
  return out


def test_committed_sweeps_choose_what_they_recorded():
  """sweep.choose is curve's rule (runs.bracket, no extensions) since the
  tools share it: every committed sweep still chooses what it wrote."""
  sweeps = _committed_sweeps()
  assert len(sweeps) >= 8, sorted(sweeps)
  for path, saved in sweeps.items():
    assert sweep.choose(saved["records"]) == saved["chosen"], path


# --- The record of a run -----------------------------------------------------


def _stub_training(monkeypatch, outcome):
  """loop.train_and_evaluate replaced: returns ``outcome``'s final metrics
  and writes an analysis (or raises it, an exception)."""

  def train(config, workdir, *, strict):
    del config
    assert strict  # A record resumes only a checkpoint of its own run.
    if isinstance(outcome, Exception):
      raise outcome
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, loop.ANALYSIS), "w") as f:
      json.dump({"layers": ["stage1", "stage2"],
                 "matched_fraction": [0.2, None],
                 "row_max_mass": [0.5, 0.6], "plan_entropy": [0.9, 0.8]}, f)
    return outcome

  monkeypatch.setattr(loop, "train_and_evaluate", train)


def test_a_finished_run_records_both_reads_and_the_plan(tmp_path,
                                                        monkeypatch):
  _stub_training(monkeypatch, {
      "test_accuracy_at_best_val": 0.81, "test_accuracy": 0.8,
      "best_val_accuracy": 0.83, "best_step": 40, "step": 50})
  cfg = DIGITS.get_config("ot")
  record = runs.run_record(cfg, str(tmp_path), method="ot", seed=3,
                           workdir="as/recorded")
  assert list(record)[:4] == ["method", "seed", "workdir", "status"]
  assert record["status"] == "finished"
  assert (record["test_accuracy_best_val"], record["test_accuracy_last"],
          record["val_accuracy_best"], record["best_step"],
          record["step"]) == (0.81, 0.8, 0.83, 40, 50)
  assert record["matched_fraction"] == {"stage1": 0.2, "stage2": None}
  assert record["row_max_mass"] == {"stage1": 0.5, "stage2": 0.6}
  assert record["config"]["method"] == "ot" and record["wall_s"] >= 0
  assert set(record) <= set(runs.Record.__annotations__)


def test_a_diverged_run_is_recorded_not_raised(tmp_path, monkeypatch):
  _stub_training(monkeypatch, loop.Diverged("nan"))
  record = runs.run_record(DIGITS.get_config("ot"), str(tmp_path),
                           method="ot", seed=0)
  assert record["status"] == "diverged"
  assert record["val_accuracy_best"] is None and record["step"] is None
  assert all(record[m] == {} for m in runs.PLAN_MEASURES)


def test_other_errors_propagate(tmp_path, monkeypatch):
  _stub_training(monkeypatch, loop.Preempted("SIGTERM", 143))
  with pytest.raises(loop.Preempted):
    runs.run_record(DIGITS.get_config("ot"), str(tmp_path))


def test_committed_curve_records_have_the_record_fields():
  paths = glob.glob(os.path.join(REPO, "docs", "regimes", "*", "*", "*", "*",
                                 "**", "seed*.json"), recursive=True)
  assert paths
  for path in paths:
    with open(path) as f:
      record = json.load(f)
    assert set(record) <= set(runs.Record.__annotations__), path
    assert record["status"] in ("finished", "diverged"), path


def test_write_json_replaces_atomically(tmp_path):
  path = tmp_path / "new" / "record.json"
  runs.write_json(str(path), {"a": 1})
  runs.write_json(str(path), {"a": 2}, indent=1)
  assert json.loads(path.read_text()) == {"a": 2}
  assert os.listdir(path.parent) == ["record.json"]  # No temporary left.


# --- Config helpers -----------------------------------------------------------


def test_overrides_apply_to_the_methods_that_have_the_key():
  configs = runs.method_configs(DIGITS, ["scratch", "ot"],
                                {"loss.terms.ot.weight": 0.5, "seed": 7})
  assert configs["ot"].loss.terms.ot.weight == 0.5
  assert "ot" not in configs["scratch"].loss.terms
  assert configs["scratch"].seed == configs["ot"].seed == 7
  assert runs.has_key(configs["ot"], "loss.terms.ot.weight")
  assert not runs.has_key(configs["scratch"], "loss.terms.ot.weight")


def test_seeded_sets_the_seeds_and_the_teachers_place(tmp_path):
  cfg = runs.seeded(DIGITS.get_config("ot"), 4, str(tmp_path))
  assert cfg.seed == 4
  assert cfg.data.seed == (4 if cfg.vary_data_seed else
                           DIGITS.get_config("ot").data.seed)
  assert cfg.teacher.workdir == os.path.join(str(tmp_path), "teacher")


def test_unknown_methods_are_named():
  assert runs.known_methods(DIGITS, None) == list(DIGITS.methods) == [
      "scratch", "finetune_l2", "l2_sp", "feature_matching", "ot"]
  with pytest.raises(ValueError, match=r"Unknown methods \['otp'\]"):
    runs.known_methods(DIGITS, ["ot", "otp"])


@pytest.mark.slow
def test_a_record_refuses_a_checkpoint_of_other_settings(teacher_dir,
                                                         tmp_path):
  # eval_every may change on a plain resume, but then the history is the old
  # cadence's: a record naming the new config would misstate its run.
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config(teacher_dir), workdir)
  other = tiny_config(teacher_dir, eval_every=5)
  with pytest.raises(ValueError, match="another run than this record's: "
                     "eval_every: 10 -> 5"):
    runs.run_record(other, workdir)
  assert runs.run_record(tiny_config(teacher_dir), workdir)["step"] == 20
