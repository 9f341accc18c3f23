"""Report tables and figures, from hand-made records and synthetic runs."""

import logging

import numpy as np
import pytest

from experiments import report
from experiments.metric_writers import MetricWriter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ("stage1", "stage2", "stage3")


def record(method, seed, best_val, last):
  return {"method": method, "seed": seed, "test_accuracy_best_val": best_val,
          "test_accuracy_last": last, "val_accuracy_best": best_val,
          "best_step": 100, "step": 200, "workdir": f"/runs/{method}/{seed}"}


RECORDS = [
    record("none", 0, 0.60, 0.58),
    record("ot", 0, 0.70, 0.69),
    record("ot", 1, 0.72, 0.70),
    record("ot", 2, 0.77, 0.74),
]


def test_summarize_means_and_sample_stds():
  none, ot = report.summarize(RECORDS)
  assert (none["method"], none["seeds"]) == ("none", 1)
  assert none["test_accuracy_best_val_mean"] == pytest.approx(0.60)
  assert none["test_accuracy_best_val_std"] == 0.0
  assert (ot["method"], ot["seeds"]) == ("ot", 3)
  assert ot["test_accuracy_best_val_mean"] == pytest.approx(0.73)
  # Deviations -0.03, -0.01, 0.04: ddof=1 gives sqrt(0.0026 / 2) (ddof=0
  # would give 0.0294).
  assert ot["test_accuracy_best_val_std"] == pytest.approx(0.036056, abs=1e-6)
  assert ot["test_accuracy_last_mean"] == pytest.approx(0.71)
  assert ot["test_accuracy_last_std"] == pytest.approx(0.026458, abs=1e-6)


def test_summarize_order_and_rerun_records():
  rerun = RECORDS + [record("none", 0, 0.62, 0.61), record("attention", 0,
                                                           0.65, 0.64)]
  summary = report.summarize(rerun, methods_order=["ot", "fitnets", "none"])
  assert [row["method"] for row in summary] == ["ot", "none", "attention"]
  assert summary[1]["seeds"] == 1
  assert summary[1]["test_accuracy_best_val_mean"] == pytest.approx(0.62)


def test_markdown_table():
  table = report.markdown_table(report.summarize(RECORDS, ["ot", "none"]))
  assert table == (
      "| method | seeds | test acc @ best val (mean ± std) "
      "| test acc @ last (mean ± std) |\n"
      "|---|---:|---:|---:|\n"
      "| ot | 3 | 73.00 ± 3.61 | 71.00 ± 2.65 |\n"
      "| none | 1 | 60.00 ± 0.00 | 58.00 ± 0.00 |\n")


def test_mean_curve_over_seeds_with_missing_steps():
  seeds = [[{"step": 10, "loss": 1.0}, {"step": 20, "loss": 3.0}],
           [{"step": 10, "loss": 2.0}, {"step": 20, "loss": float("nan")},
            {"step": 30, "loss": 5.0}],
           [{"step": 10, "loss": 6.0}]]
  steps, mean, std = report.mean_curve(seeds, "loss")
  np.testing.assert_array_equal(steps, [10, 20, 30])
  np.testing.assert_allclose(mean, [3.0, 3.0, 5.0])
  np.testing.assert_allclose(std, [np.sqrt(7.0), 0.0, 0.0])
  assert report.mean_curve(seeds, "accuracy") is None


def test_scaled_plan_shows_a_permutation_as_ones():
  perm = np.array([2, 0, 3, 1])
  plan = np.eye(4)[perm] / 4
  np.testing.assert_allclose(report.scaled_plan(plan), np.eye(4))
  np.testing.assert_allclose(report.scaled_plan(plan, sort_rows=False),
                             np.eye(4)[perm])
  # Unequal widths: each student neuron's row sums to 1.
  wide = np.full((2, 6), 1 / 12)
  np.testing.assert_allclose(report.scaled_plan(wide).sum(axis=1), 1.0)


def make_run(workdir, seed, ot_metrics):
  """A short synthetic run: train records every 10 steps, val every 50."""
  rng = np.random.default_rng(seed)
  with MetricWriter(str(workdir), tensorboard=False) as writer:
    for step in range(10, 201, 10):
      metrics = {"loss": 2.0 / (1 + step / 50) + 0.05 * rng.random(),
                 "ce": 1.5, "accuracy": step / 250}
      if ot_metrics:
        for layer in LAYERS[1:]:
          metrics[f"matched_fraction/ot/{layer}->{layer}"] = min(
              1.0, 0.2 + step / 250 + 0.02 * rng.random())
          metrics[f"sinkhorn_iters/ot/{layer}->{layer}"] = 40
        metrics["reg/ot"] = 0.1
      writer.write(step, metrics)
      if step % 50 == 0:
        writer.write(step, {"accuracy": 0.5 + step / 500 + 0.01 * seed,
                            "loss": 1.0}, split="val")
  return str(workdir)


def make_analysis(seed, with_plans=True):
  rng = np.random.default_rng(seed)
  plans = {}
  if with_plans:
    for layer, n in zip(LAYERS, (8, 16, 32)):
      plan = np.eye(n)[rng.permutation(n)] + 0.1 * rng.random((n, n))
      plans[layer] = (plan / plan.sum()).tolist()
  return {"layers": list(LAYERS),
          "matched_fraction": [None, 0.4 + 0.05 * seed, 0.8 - 0.05 * seed],
          "plans": plans}


@pytest.fixture
def runs(tmp_path):
  return {method: [make_run(tmp_path / method / str(seed), seed,
                            ot_metrics=method == "ot") for seed in range(2)]
          for method in ("none", "ot")}


def assert_png(path):
  data = path.read_bytes()
  assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_figures(tmp_path, runs):
  out = tmp_path / "figures"
  report.plot_learning_curves(runs, str(out / "curves.png"))
  report.plot_matched_fraction_training(runs, str(out / "training.png"))
  report.plot_matched_fraction_training(runs, str(out / "stage2.png"),
                                        layer_key="ot/stage2->stage2")
  analyses = {"none": [make_analysis(0, with_plans=False)],
              "ot": [make_analysis(0), make_analysis(1)]}
  report.plot_matched_fraction_depth(analyses, str(out / "depth.png"))
  report.plot_plan(analyses["ot"][0]["plans"]["stage3"], str(out / "plan.png"),
                   title="OT plan, stage3")
  for name in ("curves", "training", "stage2", "depth", "plan"):
    assert_png(out / f"{name}.png")


def test_figures_without_data_raise(tmp_path, runs):
  with pytest.raises(report.NoDataError):
    report.plot_matched_fraction_training({"none": runs["none"]},
                                          str(tmp_path / "a.png"))
  with pytest.raises(report.NoDataError):
    report.plot_matched_fraction_training(runs, str(tmp_path / "b.png"),
                                          layer_key="ot/stage9->stage9")
  with MetricWriter(str(tmp_path / "eval_only"), tensorboard=False) as writer:
    writer.write(0, {"accuracy": 0.1}, split="val")
  with pytest.raises(report.NoDataError):
    report.plot_learning_curves({"none": [str(tmp_path / "eval_only")]},
                                str(tmp_path / "c.png"), key="top5")
  with pytest.raises(report.NoDataError):
    report.plot_matched_fraction_depth(
        {"ot": [{"layers": ["fc"], "matched_fraction": [None], "plans": {}}]},
        str(tmp_path / "d.png"))
  assert not list(tmp_path.glob("*.png"))


def test_write_report(tmp_path, runs):
  out = tmp_path / "report"
  analyses = {"none": [make_analysis(0, with_plans=False)],
              "ot": [make_analysis(0), make_analysis(1)]}
  table = report.write_report(str(out), RECORDS, runs, analyses,
                              methods_order=["ot", "none"])
  assert table == report.markdown_table(
      report.summarize(RECORDS, ["ot", "none"]))
  for name in ("learning_curves", "matched_fraction_depth",
               "matched_fraction_training", "ot_plan"):
    assert_png(out / f"{name}.png")
  markdown = (out / "results.md").read_text()
  assert table in markdown and "(ot_plan.png)" in markdown


def test_write_report_skips_figures_without_data(tmp_path, runs, caplog):
  caplog.set_level(logging.INFO, logger="absl")
  out = tmp_path / "report"
  report.write_report(str(out), RECORDS[:1], {"none": runs["none"]}, {})
  assert sorted(p.name for p in out.iterdir()) == [
      "learning_curves.png", "results.md"]
  assert "skipping ot_plan.png" in caplog.text
  assert "ot_plan.png" not in (out / "results.md").read_text()


def test_figures_kept_or_skipped_where_the_runs_are_not_here(tmp_path):
  # Records without their runs' workdirs: nothing is drawn; "keep" links
  # the figures already there (the runs that made the records drew them),
  # "skip" none; neither touches the files.
  (tmp_path / "ot_plan.png").write_bytes(b"drawn before")
  for figures, linked in (("keep", True), ("skip", False)):
    report.write_report(str(tmp_path), RECORDS, {}, {}, figures=figures)
    markdown = (tmp_path / "results.md").read_text()
    assert ("![ot_plan](ot_plan.png)" in markdown) is linked, figures
    assert "learning_curves" not in markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ot_plan.png", "results.md"]
    assert (tmp_path / "ot_plan.png").read_bytes() == b"drawn before"
  with pytest.raises(ValueError, match="figures='redraw': draw, keep or"):
    report.write_report(str(tmp_path), RECORDS, {}, {}, figures="redraw")


def _paired_records():
  """Best-val and last reads per seed; ot's seed 3 diverged, l2_sp shares
  no seed with scratch."""
  runs = {("scratch", 0): (0.50, 0.52), ("scratch", 1): (0.90, 0.91),
          ("scratch", 2): (0.70, 0.70), ("scratch", 3): (0.80, 0.80),
          ("ot", 0): (0.60, 0.50), ("ot", 1): (0.88, 0.89),
          ("ot", 2): (0.74, 0.69), ("l2_sp", 7): (0.99, 0.99)}
  records = [{"method": m, "seed": s, "status": "finished",
              "test_accuracy_best_val": b, "test_accuracy_last": l}
             for (m, s), (b, l) in runs.items()]
  return records + [{"method": "ot", "seed": 3, "status": "diverged",
                     "test_accuracy_best_val": None,
                     "test_accuracy_last": None}]


def test_paired_differences_at_each_read():
  records = _paired_records()
  # Best val: +10, -2, +4 points (seed 3 diverged): mean 4, sample std 6,
  # s.e. 6 / sqrt(3); ot higher on 2 of 3.
  mean, se, better, n = report.paired(records, "ot", "scratch")
  assert (better, n) == (2, 3)
  assert mean == pytest.approx(4.0) and se == pytest.approx(6 / 3 ** 0.5)
  # Last step: -2, -2, -1: the other sign; s.e. sqrt(1/3) / sqrt(3) = 1/3.
  mean, se, better, n = report.paired(records, "ot", "scratch",
                                      "test_accuracy_last")
  assert (better, n) == (0, 3)
  assert mean == pytest.approx(-5 / 3) and se == pytest.approx(1 / 3)
  assert report.paired(records, "l2_sp", "scratch") is None


def test_paired_table_gives_both_reads_seed_by_seed():
  table = report.paired_table(_paired_records(), "scratch",
                              methods_order=["scratch", "l2_sp", "ot"])
  lines = table.splitlines()
  header = lines.index("| method − scratch (same seeds) | n | best val: "
                       "mean | s.e. | better | last: mean | s.e. | better |")
  # The reads disagree in sign: ot better at the best-val step, worse at the
  # last one. l2_sp (no common seed) and the baseline have no row.
  assert lines[header + 2:] == [
      "| ot | 3 | +4.00 | 3.46 | 2/3 | -1.67 | 0.33 | 0/3 |"]
  assert report.paired_table(_paired_records(), "absent") == ""


def test_write_report_appends_the_paired_table(tmp_path):
  records = [r for r in _paired_records() if r["status"] == "finished"]
  table = report.write_report(str(tmp_path), records, {}, {},
                              baseline="scratch")
  assert table.endswith(report.paired_table(records, "scratch"))
  assert "| ot | 3 | +4.00 | 3.46 | 2/3 | -1.67 | 0.33 | 0/3 |" in (
      tmp_path / "results.md").read_text()
  # Its contrasts reach the paired table's second table.
  table = report.write_report(str(tmp_path), records, {}, {},
                              baseline="scratch",
                              contrasts=[("scratch", "ot")])
  assert "| scratch − ot | 3 | -4.00 | 3.46 | 1/3 |" in (
      tmp_path / "results.md").read_text()


def test_paired_table_adds_the_contrasts_both_methods_ran():
  table = report.paired_table(
      _paired_records(), "scratch", methods_order=["scratch", "l2_sp", "ot"],
      contrasts=[("scratch", "ot"), ("ot", "l2_sp")])
  lines = table.splitlines()
  header = lines.index("| pair (same seeds) | n | best val: mean | s.e. | "
                       "better | last: mean | s.e. | better |")
  # scratch - ot: the baseline row's signs reversed, its wins the other's
  # losses; ot - l2_sp has no common seed, so no row.
  assert lines[header + 2:] == [
      "| scratch − ot | 3 | -4.00 | 3.46 | 1/3 | +1.67 | 0.33 | 3/3 |"]
  assert "pair (same seeds)" not in report.paired_table(
      _paired_records(), "scratch", contrasts=[("ot", "l2_sp")])
