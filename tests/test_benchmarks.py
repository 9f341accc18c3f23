"""The benchmarks run (on tiny sizes: speed is measured by running them, not
here) and write their JSON and markdown tables."""

import json

from experiments.benchmarks import ot_solver, train_step


def test_ot_solver_benchmark_runs(tmp_path):
  ot_solver.main(["--neurons", "16", "--batch", "8", "--repeats", "2",
                  "--out", str(tmp_path)])
  with open(tmp_path / "ot_solver.json") as f:
    result = json.load(f)
  rows = result["rows"]
  assert [(r["n_s"], r["n_t"]) for r in rows] == [(16, 16), (16, 8)]
  for row in rows:
    assert row["ot_ms"] > 0 and row["cost_ms"] > 0 and row["iters"] > 0
    assert abs(row["err_pct"]) < 5 and row["pot_emd_ms"] > 0
  assert result["machine"]["cpu_count"] >= 1
  assert (tmp_path / "ot_solver.md").read_text().startswith("| n_s | n_t |")


def test_train_step_benchmark_runs(tmp_path):
  train_step.main(["--models", "digits_cnn", "--batch", "8", "--repeats", "1",
                   "--out", str(tmp_path)])
  with open(tmp_path / "train_step.json") as f:
    rows = json.load(f)["rows"]
  assert [r["variant"] for r in rows] == list(train_step.VARIANTS)
  assert rows[0]["overhead_pct"] == 0.0
  assert all(r["images_per_s"] > 0 for r in rows)
