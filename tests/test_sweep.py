"""experiments.sweep: the choice on the mean over tuning seeds, the grid's
extensions and their note, sweep.json and sweep.md, the check of a student's
initialisation and the flags' errors (running a grid through runs.tune:
tests/test_runs.py; a real sweep on IDX files:
tests/test_fashion_mnist_configs.py). Fast: training is a stub
(digits_job.stub_grid_training)."""

import json
import os
import subprocess
import sys

import pytest

from digits_job import REPO, stub_grid_training, without_sweep
from experiments import loop, runs, sweep

KEY = "loss.terms.ot.weight"


def _records(accuracies, method="ot", key=KEY):
  """sweep.json records from ``{(value, seed): val accuracy or None}``."""
  return [{"method": method, "key": key, "value": v, "seed": s,
           "val_accuracy_best": a, "best_step": None if a is None else 50,
           "workdir": f"w/{v:g}/seed{s}"}
          for (v, s), a in accuracies.items()]


# Seed 100 alone would choose 0.01; the mean of 100 and 101 chooses 0.1
# (0.01: (0.90 + 0.70) / 2 = 0.80; 0.1: (0.85 + 0.83) / 2 = 0.84).
TWO_SEEDS = {(0.01, 100): 0.90, (0.1, 100): 0.85, (1.0, 100): 0.60,
             (0.01, 101): 0.70, (0.1, 101): 0.83, (1.0, 101): 0.65}


def test_two_tuning_seeds_choose_the_best_mean():
  one = {k: a for k, a in TWO_SEEDS.items() if k[1] == 100}
  assert sweep.choose(_records(one)) == {"ot": {KEY: 0.01}}
  assert sweep.choose(_records(TWO_SEEDS)) == {"ot": {KEY: 0.1}}
  grid = sweep.grid_points(_records(TWO_SEEDS))[("ot", KEY)]
  assert sweep.grid_seeds(grid) == [100, 101]
  assert sweep.grid_means(grid)[0.01] == pytest.approx(0.80)


def test_a_diverged_or_missing_seed_is_never_chosen():
  # 0.1 diverged on seed 101: the point diverged, as in runs.tune.
  diverged = {**TWO_SEEDS, (0.1, 101): None}
  assert sweep.choose(_records(diverged)) == {"ot": {KEY: 0.01}}
  # 0.1 has no run on seed 101 (an earlier invocation's grid): its seed
  # 100 alone compares with nothing.
  missing = {k: a for k, a in TWO_SEEDS.items() if k != (0.1, 101)}
  assert sweep.grid_means(
      sweep.grid_points(_records(missing))[("ot", KEY)])[0.1] is None
  assert sweep.choose(_records(missing)) == {"ot": {KEY: 0.01}}


def test_sweep_md_shows_each_seed_and_the_mean_that_chooses():
  records = _records({**TWO_SEEDS, (1.0, 101): None})
  table = sweep.markdown(records, sweep.choose(records))
  assert "tuning seeds 100, 101" in table and "test" not in table.lower()
  lines = table.splitlines()
  assert "| method | key | value | seed 100 | seed 101 | mean | best step |" \
      in lines
  assert f"| ot | {KEY} | 0.01 | 90.00 | 70.00 | 80.00 | 50, 50 |" in lines
  assert f"| ot | {KEY} | 0.1 | 85.00 | 83.00 | 84.00 * | 50, 50 |" in lines
  assert f"| ot | {KEY} | 1 | 60.00 | diverged | diverged | 50, — |" in lines


def test_a_one_seed_sweep_json_reads_as_before():
  # The first protocol's sweeps: seed 100 only (each chooses what it
  # recorded: tests/test_runs.py).
  records = _records({(0.01, 100): 0.8, (0.1, 100): 0.9, (1.0, 100): 0.9})
  assert sweep.choose(records) == {"ot": {KEY: 0.1}}
  assert "tuning seed 100," in sweep.markdown(records, {})


@pytest.mark.parametrize("flags,expected", [
    (["--tuning_seeds=10x"], "--tuning_seeds 10x: seeds are integers"),
    (["--tuning_seeds=100,100"], "give one or more distinct seeds"),
    (["--seed=100"], "--seed is now --tuning_seeds"),
    (["--extensions", "-1"], "--extensions -1: give 0 or more"),
    # runs.check_initialisation: scratch (random init, the teacher's
    # network) on tuning seed 101, the teacher's seed; refused before any
    # run (the teacher is not trained either).
    (["--methods", "scratch", "--key", "loss.weight_decay", "--values",
      "5e-4", "--config.teacher.job.seed=101"],
     "scratch: seed 101 would initialise the student with the teacher's own "
     "initial weights"),
])
def test_bad_flags_are_one_error_line_before_any_run(tmp_path, flags,
                                                     expected):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", "--config",
       "experiments/configs/transfer.py:data=digits", *flags, "--workdir",
       str(tmp_path / "work")],
      cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
  errors = [l for l in result.stderr.splitlines() if l.startswith("Error:")]
  assert result.returncode == 1, result.stderr
  assert len(errors) == 1 and expected in errors[0], result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "work").exists()


# --- Running the grids (training stubbed) ------------------------------------

DIGITS = without_sweep(runs.load_config_module(
    os.path.join(REPO, "experiments/configs/transfer.py:data=digits")))
WD = "loss.weight_decay"


def _spy_tune(monkeypatch):
  """runs.tune, its calls' (key, grid, seeds, extensions) and Tunings kept."""
  calls, original = [], runs.tune

  def spy(point, key, grid, seeds, extensions=0, train=None):
    tuning = original(point, key, grid, seeds, extensions, train)
    calls.append(((key, tuple(grid), tuple(seeds), extensions), tuning))
    return tuning

  monkeypatch.setattr(runs, "tune", spy)
  return calls


def test_an_edge_choice_extends_the_grid_and_is_runs_tunes_choice(
    tmp_path, monkeypatch):
  # Best at 0.001: the grid (0.01, 0.1) extends to 0.001, then 0.0001,
  # which brackets it.
  trained = stub_grid_training(monkeypatch, lambda w: 1 - abs(w - 1e-3))
  calls = _spy_tune(monkeypatch)
  grids = {"ot": (KEY, (0.01, 0.1))}
  records, chosen = sweep.run_sweep(DIGITS, str(tmp_path), [100, 101],
                                    grids=grids)  # Default: 2, as curve.
  ((args, tuning),) = calls
  assert args == (KEY, (0.01, 0.1), (100, 101), 2)
  assert [r["value"] for r in records[::2]] == [0.01, 0.1, 0.001, 0.0001]
  assert len(trained) == len(records) == 8
  # The choice over the records, extension points included, is tune's.
  assert chosen == {"ot": {KEY: tuning.weight}} == {"ot": {KEY: 0.001}}
  given = {"ot": {KEY: [0.01, 0.1]}}
  assert sweep.notes(records, given) == {"ot": {KEY: tuning.note}} == {
      "ot": {KEY: ""}}
  table, *_ = sweep.save(str(tmp_path), records, given)
  assert f"| ot | {KEY} | 0.001 | bracketed |" in table.splitlines()
  values = [l.split(" | ")[2] for l in table.splitlines()
            if l.startswith(f"| ot | {KEY} | ") and "seed" not in l][:4]
  assert values == ["0.0001", "0.001", "0.01", "0.1"]  # By value.
  # Without extensions (the first protocol's sweeps): the edge is kept.
  records0, chosen0 = sweep.run_sweep(DIGITS, str(tmp_path / "none"),
                                      [100], grids=grids, extensions=0)
  assert chosen0 == {"ot": {KEY: 0.01}} and len(records0) == 2
  assert "after 0 extension(s): not bracketed" in calls[-1][1].note


def test_a_choice_still_at_an_edge_is_noted_not_bracketed(tmp_path,
                                                          monkeypatch):
  # Best at 0.001: one extension reaches it, none is left to bracket it.
  stub_grid_training(monkeypatch, lambda w: 1 - abs(w - 1e-3))
  calls = _spy_tune(monkeypatch)
  root = str(tmp_path)
  records, chosen = sweep.run_sweep(DIGITS, root, [100, 101],
                                    grids={"ot": (KEY, (0.01, 0.1))},
                                    extensions=1)
  ((_, tuning),) = calls
  assert chosen == {"ot": {KEY: 0.001}} == {"ot": {KEY: tuning.weight}}
  note = "best at the smallest weight after 1 extension(s): not bracketed"
  assert tuning.note == note
  table, chosen, noted = sweep.save(root, records, {"ot": {KEY: [0.01, 0.1]}})
  assert noted == {"ot": {KEY: note}}
  assert f"| ot | {KEY} | 0.001 | {note} |" in table.splitlines()
  saved = json.load(open(os.path.join(root, "sweep.json")))
  assert saved["notes"] == noted and saved["chosen"] == chosen
  assert saved["grids"] == {"ot": {KEY: [0.01, 0.1]}}
  assert open(os.path.join(root, "sweep.md")).read() == table
  # Another method's sweep later: ot's records, grid and note stay.
  more, _ = sweep.run_sweep(DIGITS, root, [100, 101],
                            grids={"ot_uniform": (KEY, (1e-4, 1e-3, 0.01))})
  _, chosen, noted = sweep.save(root, more,
                                {"ot_uniform": {KEY: [1e-4, 1e-3, 0.01]}})
  saved = json.load(open(os.path.join(root, "sweep.json")))
  assert noted == saved["notes"] == {"ot": {KEY: note},
                                     "ot_uniform": {KEY: ""}}
  assert chosen["ot_uniform"] == {KEY: 0.001}
  assert len(saved["records"]) == len(records) + len(more)


def test_a_student_of_the_teachers_seed_is_refused_before_any_run(
    tmp_path, monkeypatch):
  trained = stub_grid_training(monkeypatch, lambda w: 0.5, key=WD)
  root = tmp_path / "sweep"
  grids = {"l2_sp": ("loss.terms.l2_sp.weight", (0.01, 0.1)),
           "scratch": (WD, (5e-4,))}
  clash = {"teacher.job.seed": 101}  # A tuning seed.
  with pytest.raises(ValueError, match=(
      r"^scratch: seed 101 would initialise the student with the teacher's "
      r"own initial weights")):
    sweep.run_sweep(DIGITS, str(root), [100, 101], overrides=clash,
                    grids=grids)
  # l2_sp, first, starts from the teacher: nothing ran, nothing written.
  assert trained == [] and not root.exists()
  # A finished run is reused, not refused: seed 100 (not the teacher's)
  # trains; 101 is finished.
  finished = root / "scratch" / f"{WD}=0.0005" / "seed101" / loop.FINAL_METRICS
  finished.parent.mkdir(parents=True)
  finished.write_text("{}")
  sweep.run_sweep(DIGITS, str(root), [100, 101], overrides=clash,
                  grids={"scratch": grids["scratch"]}, extensions=0)
  assert (5e-4, 100) in trained


def test_a_rerun_reuses_the_records_in_out_and_refuses_other_settings(
    tmp_path, monkeypatch):
  # --out keeps each point's record with its config (a committed sweep): on
  # a fresh checkout, without the workdir, a rerun trains nothing.
  trained = stub_grid_training(monkeypatch, lambda w: 1 - abs(w - 0.1))
  grids = {"ot": (KEY, (0.01, 0.1, 1.0))}
  out = tmp_path / "docs"
  records, chosen = sweep.run_sweep(DIGITS, str(tmp_path / "work"),
                                    [100, 101], grids=grids, out=str(out))
  assert len(trained) == len(records) == 6 and chosen == {"ot": {KEY: 0.1}}
  assert sorted(os.listdir(out / "tuning" / "ot")) == [
      f"{KEY}=0.01", f"{KEY}=0.1", f"{KEY}=1"]
  saved = runs.read_json(sweep.record_path(str(out), "ot", KEY, 0.1, 101))
  assert saved["config"]["loss"]["terms"]["ot"]["weight"] == 0.1
  fresh = tmp_path / "fresh"
  again, chosen_again = sweep.run_sweep(DIGITS, str(fresh), [100, 101],
                                        grids=grids, out=str(out))
  assert len(trained) == 6 and not fresh.exists()
  assert (again, chosen_again) == (records, chosen)
  with pytest.raises(ValueError, match=(
      r"seed100.json was made with other settings than this command builds: "
      r"num_steps")):
    sweep.run_sweep(DIGITS, str(fresh), [100, 101], grids=grids,
                    out=str(out), overrides={"num_steps": 7})
  assert len(trained) == 6


def test_sweep_json_keys_without_a_grid_count_no_extension():
  # The first protocol's sweeps: no "grids"; a sweep of an earlier grid
  # counts its points beyond the one given as extensions.
  records = _records({(0.001, 100): 0.9, (0.01, 100): 0.8, (0.1, 100): 0.7})
  assert sweep.notes(records) == {"ot": {KEY: (
      "best at the smallest weight after 0 extension(s): not bracketed")}}
  assert sweep.notes(records, {"ot": {KEY: [0.01, 0.1]}}) == {"ot": {KEY: (
      "best at the smallest weight after 1 extension(s): not bracketed")}}
  assert sweep.choose(records) == {"ot": {KEY: 0.001}}
