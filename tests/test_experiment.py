"""The end-to-end job: outputs, restore, resume after SIGKILL, reproduce."""

import json
import os
import subprocess

import numpy as np
import pytest

from experiments import reproduce
from ot_transfer_jax import checkpoint, data, experiment, train
from ot_transfer_jax.metric_writers import read_metrics

from digits_job import REPO, main_command, tiny_config


def test_job_writes_outputs_and_restores(teacher_dir, tmp_path):
  final = experiment.train_and_evaluate(tiny_config(teacher_dir), str(tmp_path))
  with open(tmp_path / "final_metrics.json") as f:
    assert json.load(f) == final
  for key in ("test_accuracy", "val_accuracy", "step", "best_val_accuracy",
              "test_accuracy_at_best_val"):
    assert final[key] is not None, key
  assert final["step"] == 20 and final["method"] == "ot"
  assert 0.2 < final["test_accuracy"] <= 1.0  # 5 classes: above chance.

  records = read_metrics(str(tmp_path))
  splits = {r["split"] for r in records}
  assert splits == {"train", "val", "test"}
  train_rec = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train_rec] == [5, 10, 15, 20]
  assert "matched_fraction/stage1->stage1" in train_rec[-1]
  assert os.listdir(tmp_path / "tensorboard")

  with open(tmp_path / "analysis.json") as f:
    analysis = json.load(f)
  assert analysis["layers"] == ["stage1", "stage2", "stage3"]
  assert all(0 <= m <= 1 + 1e-5 for m in analysis["matched_fraction"])
  assert np.asarray(analysis["plans"]["stage2"]).shape == (32, 32)

  restored = checkpoint.restore(str(tmp_path))
  assert restored.step == 20 and restored.config.method == "ot"
  ds_check = data.get_datasets(restored.config.data)
  np.testing.assert_allclose(restored.mean, ds_check.mean)
  np.testing.assert_allclose(restored.std, ds_check.std)
  ds = data.get_datasets(restored.config.data)
  mesh = train.make_mesh()
  test = train.evaluate(
      train.make_eval_step(restored.model, mesh), restored.variables,
      data.eval_batches(ds.test, batch_size=128, image_size=None,
                        mean=ds.mean, std=ds.std), mesh)
  assert test["accuracy"] == pytest.approx(final["test_accuracy"])

  # Rerunning a finished job resumes at its end and reports the same numbers.
  assert experiment.train_and_evaluate(tiny_config(teacher_dir),
                                       str(tmp_path)) == final


def test_config_key_typo_gives_one_paragraph(teacher_dir, tmp_path):
  proc = subprocess.run(main_command(tmp_path, teacher_dir,
                              "--config.loss.wieght=1"),
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert "'wieght'" in proc.stderr and 'Did you mean "weight"' in proc.stderr


def test_unknown_method_lists_the_defined_ones(teacher_dir, tmp_path):
  with pytest.raises(ValueError, match="choose one of .*'l2_sp'"):
    experiment.train_and_evaluate(tiny_config(teacher_dir, method="magic"),
                                  str(tmp_path))


@pytest.mark.parametrize("method", ["ot", "l2_sp", "finetune_l2"])
def test_teacher_dependent_methods_without_teacher_are_refused(tmp_path,
                                                               method):
  c = tiny_config(tmp_path / "none", method=method)
  c.teacher.source = "none"
  with pytest.raises(ValueError, match="needs a teacher"):
    experiment.train_and_evaluate(c, str(tmp_path))


def test_analysis_layer_typo_fails_before_training(teacher_dir, tmp_path):
  c = tiny_config(teacher_dir, analysis_layers=("stage9",))
  with pytest.raises(ValueError, match="analysis_layers.*'stage9'"):
    experiment.train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_cli_errors_are_one_message(teacher_dir, tmp_path):
  proc = subprocess.run(
      main_command(tmp_path, teacher_dir, "--config.method=magic"), cwd=REPO,
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert "Error: method='magic' is not defined" in proc.stderr


def test_restore_without_checkpoints_says_what_to_do(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="train first"):
    checkpoint.restore(str(tmp_path))


def test_reproduce_writes_results_table_and_figures(teacher_dir, tmp_path):
  config = tiny_config(teacher_dir)
  records, table = reproduce.run_all(config, str(tmp_path), seeds=2,
                                     methods=["scratch", "ot"])
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved == records and len(records) == 4
  assert [(r["method"], r["seed"]) for r in records] == [
      ("scratch", 0), ("scratch", 1), ("ot", 0), ("ot", 1)]
  for r in records:
    for key in ("test_accuracy_best_val", "test_accuracy_last"):
      assert 0 <= r[key] <= 1
  assert "| scratch | 2 |" in table and "| ot | 2 |" in table
  for name in ("results.md", "learning_curves.png", "ot_plan.png",
               "matched_fraction_depth.png", "matched_fraction_training.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  # Seeds differ in their data draw; methods share it.
  with pytest.raises(ValueError, match="Unknown methods"):
    reproduce.run_all(config, str(tmp_path), seeds=1, methods=["nope"])


@pytest.mark.parametrize("name", ["digits_distill", "digits_cross_arch"])
def test_every_digits_method_runs(name, tmp_path):
  module = __import__(f"experiments.configs.{name}", fromlist=["get_config"])
  config = module.get_config()
  assert f"experiments/configs/{name}.py" in module.__doc__
  config.update({"num_steps": 3, "eval_every": 3, "log_every": 1,
                 "checkpoint_every": 3})
  config.teacher.job.num_steps = 5
  config.teacher.workdir = str(tmp_path / "teacher")
  for method in config.method_order:
    config.method = method
    final = experiment.train_and_evaluate(config, str(tmp_path / method))
    assert final["step"] == 3 and 0 <= final["test_accuracy"] <= 1
    last_train = read_metrics(str(tmp_path / method), split="train")[-1]
    if config.methods[method].get("loss", {}).get("method", "none") != "none":
      assert np.isfinite(last_train["reg"]) and last_train["reg"] > 0, method
    if config.methods[method].get("loss", {}).get("kd_weight", 0) > 0:
      assert last_train["kd"] > 0, method
