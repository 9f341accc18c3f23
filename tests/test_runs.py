"""experiments.runs: the record of a run, choosing on validation, config helpers.

Fast: training is replaced by a stub that returns final metrics and writes an
``analysis.json`` (the end-to-end tools are tested in test_curve.py,
test_experiment.py and test_fashion_mnist_configs.py).
"""

import glob
import json
import os
import shutil

import pytest

from digits_job import (REPO, stub_grid_training, tiny_config,
                        without_sweep)
from experiments import curve, loop, runs, sweep

DIGITS = without_sweep(runs.load_config_module(
    os.path.join(REPO, "experiments/configs/transfer.py:data=digits")))


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
  # None allowed (sweep --extensions 0, as the first protocol's sweeps): an edge
  # best is chosen, and said to be one.
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


@pytest.mark.parametrize("seeds,table_seeds,match", [
    (["100", "1o1"], None, "--tuning_seeds 100,1o1: seeds are integers"),
    (["100.5"], None, "seeds are integers"),
    ([], None, "one or more distinct"),
    (["100", "100"], None, "one or more distinct"),
    (["-1"], None, "non-negative"),
    (["3", "100"], 5, "tuning_seeds 3 is one of the table's seeds 0 .. 4.*"
     "Pass --tuning_seeds 100,101"),
])
def test_tuning_seeds_refused_with_the_fix(seeds, table_seeds, match):
  with pytest.raises(ValueError, match=match):
    runs.parse_tuning_seeds(seeds, table_seeds)


def test_tuning_seeds_are_ints_and_a_sweep_knows_no_table_seed():
  assert runs.parse_tuning_seeds([" 100", "101"], table_seeds=10) == [100,
                                                                      101]
  assert runs.parse_tuning_seeds(["3"]) == [3]  # Sweep: cannot check.


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
  """sweep.choose is curve's rule (runs.bracket) since the tools share it:
  every committed sweep still chooses what it wrote. The first protocol's
  (first_protocol/, vit_distill's) were made without extensions (before
  sweep had --extensions) and keep no grids: each note re-derived counts
  none, which is what they ran; the protocol's keep their grids and
  notes."""
  sweeps = _committed_sweeps()
  assert len(sweeps) >= 8, sorted(sweeps)
  for path, saved in sweeps.items():
    assert sweep.choose(saved["records"]) == saved["chosen"], path
    if "grids" in saved:  # A rerun's sweep.json: its notes are its own.
      assert sweep.notes(saved["records"], saved["grids"]) == (
          saved["notes"]), path
      continue
    for kv in sweep.notes(saved["records"]).values():
      for note in kv.values():
        assert "extension(s)" not in note or "after 0 " in note, (path,
                                                                 note)


# --- One way to run a weight grid ---------------------------------------------

OT = "loss.terms.ot.weight"


def _point(tmp_path, keep=True):
  def point(weight, seed):
    (cfg,) = runs.method_configs(DIGITS, ["ot"], {OT: weight}).values()
    where = tmp_path / f"{weight:g}" / f"seed{seed}"
    return runs.Planned(runs.seeded(cfg, seed, str(tmp_path)), str(where),
                        str(where) + ".json" if keep else None,
                        {"method": "ot", "seed": seed})
  return point


def test_tune_means_the_tuning_seeds_extends_and_reuses_kept_records(
    tmp_path, monkeypatch):
  trained = stub_grid_training(monkeypatch, lambda w: 1 - abs(w - 1e-3))
  tuning = runs.tune(_point(tmp_path), OT, (0.01, 0.1), [100, 101],
                     extensions=2)
  # The best is at the smallest weight: the grid grows 10x that way, twice.
  assert list(tuning.grid) == [0.01, 0.1, 0.001, 0.0001]
  assert tuning.weight == 0.001 and tuning.note == ""
  assert tuning.grid[0.01] == pytest.approx(1 - 0.009 + 0.1005)
  assert [r["seed"] for r in tuning.records[0.1]] == [100, 101]
  assert len(trained) == 8
  # The kept records are the runs: nothing trains again.
  again = runs.tune(_point(tmp_path), OT, (0.01, 0.1), [100, 101],
                    extensions=2)
  assert len(trained) == 8
  assert (again.weight, again.grid, again.note) == (
      tuning.weight, tuning.grid, tuning.note)

  def longer(weight, seed):  # Another result than the kept records.
    run = _point(tmp_path)(weight, seed)
    with run.config.unlocked():
      run.config.num_steps = 7
    return run

  with pytest.raises(ValueError, match="num_steps: 200 -> 7"):
    runs.tune(longer, OT, (0.01,), [100])
  assert len(trained) == 8


def test_tune_without_extensions_is_a_sweeps_choice(tmp_path, monkeypatch):
  stub_grid_training(monkeypatch, lambda w: 1 - w)
  tuning = runs.tune(_point(tmp_path, keep=False), OT, (0.01, 0.1, 1.0),
                     [100])
  assert tuning.weight == 0.01 and list(tuning.grid) == [0.01, 0.1, 1.0]
  assert "not bracketed" in tuning.note
  records = [{"key": OT, "value": w, **r}
             for w, rs in tuning.records.items() for r in rs]
  assert sweep.choose(records) == {"ot": {OT: tuning.weight}}
  # Without a record path the workdir alone keeps a run.
  assert not [p for p in tmp_path.glob("**/*.json") if p.name != loop.ANALYSIS]


def test_sweep_and_curve_run_their_grids_through_tune(tmp_path, monkeypatch):
  stub_grid_training(monkeypatch, lambda w: 1 - abs(w - 0.1))
  calls = []
  original = runs.tune

  def spy(point, key, grid, seeds, extensions=0, train=None):
    calls.append((key, tuple(grid), tuple(seeds), extensions))
    return original(point, key, grid, seeds, extensions, train)

  monkeypatch.setattr(runs, "tune", spy)
  grid = (0.01, 0.1, 1.0)
  records, chosen = sweep.run_sweep(DIGITS, str(tmp_path / "sweep"),
                                    [100, 101], ["ot"],
                                    grids={"ot": (OT, grid)})
  # curve's default extensions (2); 0.1 is bracketed: none runs.
  assert calls == [(OT, grid, (100, 101), 2)]
  assert chosen == {"ot": {OT: 0.1}}
  # One record per point and tuning seed, each seed in its own workdir.
  assert [tuple(r) for r in records] == [sweep.FIELDS] * 6
  assert [(r["value"], r["seed"]) for r in records[2:4]] == [(0.1, 100),
                                                              (0.1, 101)]
  assert records[3]["workdir"] == str(tmp_path / "sweep" / "ot" /
                                      f"{OT}=0.1" / "seed101")
  study = curve.Curve(DIGITS, "data.samples_per_class", [5], ["l2_sp", "ot"],
                      1, str(tmp_path / "out"), str(tmp_path / "work"), {},
                      grids={"ot": grid})
  choice = study.tune(5, "ot")
  assert calls[1:] == [(OT, grid, (100, 101), 2)]
  assert (choice["weight"], choice["bracketed"]) == (0.1, True)
  assert os.path.exists(study._tuning_path("samples_per_class=5", "ot", 0.1,
                                           101))


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


def _teacher_seeded(method, seed, **edits):
  """DIGITS' ``method`` with its teacher trained with ``seed`` and ``edits``
  (dotted keys) applied."""
  cfg = DIGITS.get_config(method)
  with cfg.unlocked():
    cfg.update_from_flattened_dict({"teacher.job.seed": seed, **edits})
  return cfg


def test_a_scratch_student_of_the_teachers_seed_is_refused_naming_the_fix():
  cfg = _teacher_seeded("scratch", 3)
  with pytest.raises(ValueError, match=(
      r"^scratch: seed 3 would initialise the student with the teacher's own "
      r"initial weights .*--config.teacher.job.seed=1000 and a new "
      r"teacher.workdir")):
    runs.check_initialisation(cfg, [0, 1, 2, 3], "scratch")
  # No newline: the tools print it as one Error: line.
  with pytest.raises(ValueError) as e:
    runs.check_initialisation(cfg, [3], "scratch")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("method,seeds,edits", [
    ("scratch", [0, 1, 2], {}),  # The seed is not one left to train.
    ("scratch", [3], {"model.kwargs": {"width": 0.5}}),  # Another network.
    ("l2_sp", [3], {}),  # Starts from the trained teacher's weights.
    ("scratch", [3], {"teacher.source": "checkpoint"}),  # Not trained here.
])
def test_only_a_random_start_of_the_teachers_network_and_seed_is_refused(
    method, seeds, edits):
  runs.check_initialisation(_teacher_seeded(method, 3, **edits), seeds,
                            method)


def test_a_default_width_is_the_same_network_as_width_one():
  # small_cnn without kwargs and with width 1.0 are one network: refused.
  cfg = runs.load_config_module(os.path.join(
      REPO, "experiments/configs/transfer.py:data=fashion_mnist")).get_config(
          "scratch")
  with cfg.unlocked():
    cfg.model.kwargs = {"width": 1.0}
    cfg.teacher.job.seed = 0
  with pytest.raises(ValueError, match="teacher's own initial weights"):
    runs.check_initialisation(cfg, [0], "scratch")


@pytest.mark.parametrize("source, error", [
    ("def get_config(arg=None):\n  return None\n", "has no get_methods"),
    ("def get_methods(arg=None):\n  return {}\n", "returns no method"),
])
def test_a_config_file_without_a_suite_is_refused(tmp_path, source, error):
  path = tmp_path / "suiteless.py"
  path.write_text(source)
  with pytest.raises(ValueError, match=error):
    runs.load_config_module(f"{path}:data=digits")


def test_unknown_methods_are_named():
  assert runs.known_methods(DIGITS, None) == list(DIGITS.methods) == [
      "scratch", "finetune", "l2_sp", "feature_matching", "ot",
      "ot_uniform", "ot_standardize"]
  with pytest.raises(ValueError, match=r"Unknown methods \['otp'\]"):
    runs.known_methods(DIGITS, ["ot", "otp"])


@pytest.mark.slow
def test_a_record_refuses_a_checkpoint_of_other_settings(digits_run,
                                                         teacher_dir,
                                                         tmp_path):
  # eval_every may change on a plain resume, but then the history is the old
  # cadence's: a record naming the new config would misstate its run.
  workdir = str(tmp_path / "run")  # A finished run of tiny_config(teacher_dir).
  shutil.copytree(digits_run, workdir)
  other = tiny_config(teacher_dir, eval_every=5)
  with pytest.raises(ValueError, match="another run than this record's: "
                     "eval_every: 10 -> 5"):
    runs.run_record(other, workdir)
  assert runs.run_record(tiny_config(teacher_dir), workdir)["step"] == 20
