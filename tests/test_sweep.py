"""experiments.sweep: the choice on the mean over tuning seeds, sweep.md and
the flag's errors (running a grid through runs.tune: tests/test_runs.py; a
real sweep on IDX files: tests/test_fashion_mnist_configs.py)."""

import subprocess
import sys

import pytest

from digits_job import REPO
from experiments import sweep

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
  # The committed sweeps: seed 100 only (every one of them chooses what it
  # recorded: tests/test_runs.py).
  records = _records({(0.01, 100): 0.8, (0.1, 100): 0.9, (1.0, 100): 0.9})
  assert sweep.choose(records) == {"ot": {KEY: 0.1}}
  assert "tuning seed 100," in sweep.markdown(records, {})


@pytest.mark.parametrize("flag,expected", [
    ("--tuning_seeds=10x", "--tuning_seeds 10x: seeds are integers"),
    ("--tuning_seeds=100,100", "give one or more distinct seeds"),
    ("--seed=100", "--seed is now --tuning_seeds"),
])
def test_bad_tuning_seeds_are_one_error_line_before_any_run(tmp_path, flag,
                                                            expected):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", "--config",
       "experiments/configs/transfer.py:data=digits", flag, "--workdir",
       str(tmp_path / "work")],
      cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
  errors = [l for l in result.stderr.splitlines() if l.startswith("Error:")]
  assert result.returncode == 1, result.stderr
  assert len(errors) == 1 and expected in errors[0], result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "work").exists()
