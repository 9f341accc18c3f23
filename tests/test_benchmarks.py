"""The benchmarks run (on tiny sizes: speed is measured by running them, not
here) and write their JSON and markdown tables."""

import json
import sys

import jax
import pytest

from experiments.benchmarks import accelerator, ot_solver, train_step


@pytest.mark.slow  # Times every variant: minutes on 2 cores.
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


@pytest.mark.slow  # Times every variant: minutes on 2 cores.
def test_train_step_benchmark_runs(tmp_path):
  train_step.main(["--models", "digits_cnn", "--batch", "8", "--repeats", "1",
                   "--out", str(tmp_path)])
  with open(tmp_path / "train_step.json") as f:
    rows = json.load(f)["rows"]
  assert [r["variant"] for r in rows] == list(train_step.VARIANTS)
  assert list(train_step.VARIANTS) == list(accelerator.VARIANTS)
  assert [r["model"] for r in rows] == ["digits_cnn"] * len(rows)
  assert rows[0]["overhead_pct"] == 0.0
  assert all(r["images_per_s"] > 0 for r in rows)


@pytest.mark.slow  # Times every variant: minutes on 2 cores.
def test_accelerator_benchmark_runs_without_pot(tmp_path, monkeypatch):
  # An accelerator machine may have only the core installed: no POT.
  monkeypatch.setitem(sys.modules, "ot", None)
  accelerator.main(["--tiny", "--out", str(tmp_path)])
  with open(tmp_path / "accelerator.json") as f:
    result = json.load(f)
  assert result["device"] == jax.devices()[0].device_kind
  ot_rows = result["ot_solver"]["rows"]
  assert [(r["n_s"], r["n_t"]) for r in ot_rows] == [(16, 16), (16, 8)]
  for row in ot_rows:
    assert row["ot_ms"] > 0 and row["warm_ms"] > 0 and row["cost_ms"] > 0
    assert row["cold_over_cost"] == pytest.approx(row["ot_ms"] / row["cost_ms"])
    assert "pot_emd_ms" not in row and "err_pct" not in row
  rows = result["train_step"]["rows"]
  assert [r["variant"] for r in rows] == list(accelerator.TINY["variants"])
  assert rows[0]["overhead_pct"] == 0.0
  assert all(r["images_per_s"] > 0 and "overhead_pct" in r for r in rows)
  text = (tmp_path / "accelerator.md").read_text()
  assert text.startswith(f"# Accelerator benchmark: {result['device']}")
  assert "## OT solver" in text and "## Train step" in text
  assert "skipped" not in text.split("\n")[2]


def test_accelerator_benchmark_skips_what_does_not_fit_its_budget(tmp_path):
  accelerator.main(["--tiny", "--budget-s", "0", "--out", str(tmp_path)])
  with open(tmp_path / "accelerator.json") as f:
    result = json.load(f)
  rows = result["ot_solver"]["rows"] + result["train_step"]["rows"]
  assert len(rows) == 2 + len(accelerator.TINY["variants"])
  assert all(r["skipped"] == "time budget" and "ot_ms" not in r
             and "step_ms" not in r for r in rows)
  assert "4 rows skipped" in (tmp_path / "accelerator.md").read_text()


def test_accelerator_benchmark_without_the_experiments_extra(tmp_path,
                                                             monkeypatch):
  # Without tfds/grain the train-step module cannot load: the OT table is
  # still written, and the train-step table says what is missing.
  monkeypatch.setitem(sys.modules, "experiments.benchmarks.train_step", None)
  accelerator.main(["--tiny", "--budget-s", "0", "--out", str(tmp_path)])
  with open(tmp_path / "accelerator.json") as f:
    result = json.load(f)
  assert len(result["ot_solver"]["rows"]) == 2
  [row] = result["train_step"]["rows"]
  assert "needs the experiments extra" in row["skipped"]
  assert "experiments.benchmarks.train_step" in row["skipped"]
