"""The benchmarks run (on tiny sizes: speed is measured by running them, not
here) and write their JSON and markdown tables."""

import json
import sys

import jax
import pytest

from experiments.benchmarks import accelerator, ot_solver, train_cost, train_step


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
    assert row["ott_ms"] > 0 and row["ott_iters"] > 0  # ott-jax's anchor.
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
  # Budget: a loaded CPU must not skip rows.
  accelerator.main(["--tiny", "--budget-s", "1e6", "--out", str(tmp_path)])
  with open(tmp_path / "accelerator.json") as f:
    result = json.load(f)
  assert result["device"] == jax.devices()[0].device_kind
  ot_rows = result["ot_solver"]["rows"]
  assert [(r["n_s"], r["n_t"]) for r in ot_rows] == [(16, 16), (16, 8)]
  for row in ot_rows:
    assert row["ot_ms"] > 0 and row["warm_ms"] > 0 and row["cost_ms"] > 0
    assert row["cold_over_cost"] == pytest.approx(row["ot_ms"] / row["cost_ms"])
    assert "pot_emd_ms" not in row and "err_pct" not in row
  cost_rows = result["train_cost"]["rows"]
  assert [r["variant"] for r in cost_rows] == [
      "task only", "+ Omega_I", "+ Omega_P", "Omega_P floor"]
  assert all(r["step_ms"] > 0 for r in cost_rows)
  assert cost_rows[2]["iters_max"] >= 1
  with open(tmp_path / "train_cost.json") as f:  # The table alone, too.
    assert json.load(f)["rows"] == cost_rows
  rows = result["train_step"]["rows"]
  assert [r["variant"] for r in rows] == list(accelerator.TINY["variants"])
  assert rows[0]["overhead_pct"] == 0.0
  assert all(r["images_per_s"] > 0 and "overhead_pct" in r for r in rows)
  text = (tmp_path / "accelerator.md").read_text()
  assert text.startswith(f"# Accelerator benchmark: {result['device']}")
  assert all(f"## {t}" in text for t in ("OT solver", "Training cost",
                                         "Train step"))
  assert "skipped" not in text.split("\n")[2]


def test_accelerator_benchmark_skips_what_does_not_fit_its_budget(tmp_path):
  accelerator.main(["--tiny", "--budget-s", "0", "--out", str(tmp_path)])
  with open(tmp_path / "accelerator.json") as f:
    result = json.load(f)
  rows = (result["ot_solver"]["rows"] + result["train_cost"]["rows"] +
          result["train_step"]["rows"])
  assert len(rows) == 2 + 1 + len(accelerator.TINY["variants"])
  assert all(r["skipped"] == "time budget" and "ot_ms" not in r
             and "step_ms" not in r for r in rows)
  assert "5 rows skipped" in (tmp_path / "accelerator.md").read_text()


def test_accelerator_benchmark_without_the_experiments_extra(tmp_path,
                                                             monkeypatch):
  # Without tfds/grain the train-step module cannot load: the OT table is
  # still written, and the train-step table says what is missing.
  for name in ("train_step", "train_cost"):
    monkeypatch.setitem(sys.modules, f"experiments.benchmarks.{name}", None)
  accelerator.main(["--tiny", "--budget-s", "0", "--out", str(tmp_path)])
  with open(tmp_path / "accelerator.json") as f:
    result = json.load(f)
  assert len(result["ot_solver"]["rows"]) == 2
  for name in ("train_step", "train_cost"):
    [row] = result[name]["rows"]
    assert "needs the experiments extra" in row["skipped"]
    assert f"experiments.benchmarks.{name}" in row["skipped"]
  assert not (tmp_path / "train_cost.json").exists()


def test_train_cost_variants_are_the_configs_methods():
  # Task only is the Omega_P run without its terms; the reference is the
  # config's own Omega_I / FitNets method; evaluation is off in all three.
  for setting, (ref_method, ref_label) in train_cost.SETTINGS.items():
    configs = train_cost.variant_configs(setting, workdir="/w")
    assert list(configs) == [train_cost.TASK, ref_label, train_cost.OMEGA_P,
                             train_cost.FLOOR]
    task, ref, omega_p, floor = configs.values()
    assert dict(task.loss.terms) == {}
    assert list(ref.loss.terms) == [ref_method]
    assert list(omega_p.loss.terms) == list(floor.loss.terms) == ["ot"]
    assert floor.loss.terms.ot.options.max_iterations == 2 < (
        omega_p.loss.terms.ot.options.max_iterations)
    assert floor.loss.terms.ot.options.block == 2
    assert omega_p.loss.terms.ot.options.solver == "auto"
    assert all(c.eval_every == 0 and c.teacher.workdir == f"/w/{setting}/teacher"
               for c in configs.values())
    # Everything but the terms is the Omega_P run's.
    assert task.num_steps == omega_p.num_steps and task.init_from_teacher == (
        omega_p.init_from_teacher)


def test_train_cost_times_each_solver_it_is_given():
  configs = train_cost.variant_configs(
      "digits_transfer", workdir="/w", solvers=("per_layer", "batched"))
  assert list(configs) == [train_cost.TASK, "+ Omega_I",
                           "+ Omega_P (per_layer)", "+ Omega_P (batched)",
                           train_cost.FLOOR]
  solver = lambda label: configs[label].loss.terms.ot.options.solver
  assert solver("+ Omega_P (per_layer)") == "per_layer"
  assert solver("+ Omega_P (batched)") == "batched"
  assert solver(train_cost.FLOOR) == "per_layer"  # The first solver's floor.
  with pytest.raises(ValueError, match="choose one or more of"):
    train_cost.variant_configs("digits_transfer", solvers=("fast",))


def test_train_cost_row_reports_mean_median_p90_and_iterations_per_step():
  v = train_cost.Variant("+ Omega_P", None, None, None, None,
                         seconds=[0.001, 0.002, 0.003, 0.010],
                         iters=[2, 4, 6, 8, 10, 12, 14, 16],
                         step_iters=[6, 22], unconverged=[0.0] * 8)
  row = train_cost._row("digits_transfer", v)
  assert row["step_ms"] == pytest.approx(2.5)
  assert row["mean_ms"] == pytest.approx(4.0)
  assert row["p90_ms"] == pytest.approx(7.9)
  assert row["step_iters_mean"] == 14 and row["step_iters_median"] == 14
  assert row["iters_max"] == 16 and row["unconverged_pct"] == 0
  for column in ("mean_ms", "p90_ms", "over_ref_mean", "step_iters_mean"):
    assert column in train_cost.TRAIN_COST_COLUMNS


@pytest.mark.slow
def test_train_cost_benchmark_runs(tmp_path):
  train_cost.main(["--tiny", "--out", str(tmp_path / "out"),
                   "--workdir", str(tmp_path / "work")])
  with open(tmp_path / "out" / "train_cost.json") as f:
    result = json.load(f)
  rows = result["rows"]
  assert [(r["setting"], r["variant"]) for r in rows] == [
      ("digits_transfer", v) for v in ("task only", "+ Omega_I", "+ Omega_P",
                                       "Omega_P floor")]
  assert all(r["steps"] == train_cost.TINY_STEPS and r["step_ms"] > 0
             for r in rows)
  assert rows[0]["over_task"] == 1.0
  assert rows[2]["over_ref"] == pytest.approx(rows[2]["step_ms"] /
                                              rows[1]["step_ms"])
  assert rows[2]["over_ref_mean"] == pytest.approx(rows[2]["mean_ms"] /
                                                   rows[1]["mean_ms"])
  assert rows[2]["step_ms"] <= rows[2]["p90_ms"]
  # Iterations per step: the 3 layers' together.
  assert rows[2]["step_iters_median"] >= 3 * 1
  # Iterations only where Sinkhorn runs: 3 layers x TINY_STEPS layer-steps.
  assert "iters_median" not in rows[0] and "iters_median" not in rows[1]
  assert 1 <= rows[2]["iters_median"] <= rows[2]["iters_p90"] <= (
      rows[2]["iters_max"])
  assert rows[3]["iters_max"] <= 2
  text = (tmp_path / "out" / "train_cost.md").read_text()
  assert "| digits_transfer | + Omega_P |" in text


def test_train_cost_skips_fashion_mnist_without_its_files(tmp_path):
  rows = train_cost.bench_setting("fashion_mnist_transfer",
                                  data_dir=str(tmp_path))
  assert rows == [{"setting": "fashion_mnist_transfer",
                   "skipped": rows[0]["skipped"]}]
  assert rows[0]["skipped"].startswith("no data: the Fashion-MNIST IDX files")
  assert str(tmp_path) in rows[0]["skipped"]
