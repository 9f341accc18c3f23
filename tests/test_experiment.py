"""The end-to-end job: outputs, restore, resume after SIGKILL, reproduce."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import data, job, loop, reproduce, runs, same_run, terms
from experiments.configs import common, transfer
from experiments.metric_writers import read_metrics
from ot_transfer_jax import checkpoint, inference, parallel

import doc_support
from digits_job import (ARG, REPO, TEACHER_TINY, TINY, main_command,
                        tiny_config)


@pytest.mark.slow
def test_job_writes_outputs_and_restores(teacher_dir, tmp_path):
  final = loop.train_and_evaluate(tiny_config(teacher_dir), str(tmp_path))
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
  assert "matched_fraction/ot/stage1->stage1" in train_rec[-1]
  assert os.listdir(tmp_path / "tensorboard")

  with open(tmp_path / "analysis.json") as f:
    analysis = json.load(f)
  assert analysis["layers"] == ["stage1", "stage2", "stage3"]
  assert all(0 <= m <= 1 + 1e-5 for m in analysis["matched_fraction"])
  assert np.asarray(analysis["plans"]["stage2"]).shape == (32, 32)

  restored = inference.restore(str(tmp_path))
  assert restored.step == 20 and restored.config.method == "ot"
  # The inputs were normalised with the teacher's statistics (the config's
  # teacher_normalization), which the student's checkpoint keeps.
  assert restored.config.teacher_normalization
  teacher = inference.restore(str(teacher_dir))
  np.testing.assert_allclose(restored.mean, teacher.mean)
  np.testing.assert_allclose(restored.std, teacher.std)
  ds = data.get_datasets(restored.config.data)
  assert not np.allclose(restored.mean, ds.mean)  # Not the student's own.
  mesh = parallel.make_mesh()
  test = parallel.evaluate(
      parallel.make_eval_step(restored.model, mesh), restored.variables,
      data.eval_batches(ds.test, batch_size=128, image_size=None,
                        mean=restored.mean, std=restored.std), mesh)
  assert test["accuracy"] == pytest.approx(final["test_accuracy"])

  # Rerunning a finished job resumes at its end and reports the same numbers.
  assert loop.train_and_evaluate(tiny_config(teacher_dir),
                                       str(tmp_path)) == final


@pytest.mark.slow
def test_periodic_actions_set_to_0_run_at_the_last_step_only(teacher_dir,
                                                            tmp_path):
  """every=0 turns a periodic action off; the last step still logs, evaluates
  and checkpoints (and the SIGTERM/SIGINT vote does not divide by 0)."""
  final = loop.train_and_evaluate(
      tiny_config(teacher_dir, num_steps=4, log_every=0, eval_every=0,
                  checkpoint_every=0), str(tmp_path))
  assert final["step"] == 4 and final["best_step"] == 4
  assert [(r["split"], r["step"]) for r in read_metrics(str(tmp_path))] == [
      ("train", 4), ("val", 4), ("test", 4)]
  assert inference.restore(str(tmp_path)).step == 4


@pytest.mark.slow
def test_config_key_typo_gives_one_paragraph(teacher_dir, tmp_path):
  proc = subprocess.run(main_command(tmp_path, teacher_dir,
                              "--config.loss.terms.ot.wieght=1"),
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert "'wieght'" in proc.stderr and 'Did you mean "weight"' in proc.stderr


@pytest.mark.slow
def test_command_line_override_wins_over_the_method(teacher_dir, tmp_path):
  proc = subprocess.run(main_command(
      tmp_path, teacher_dir, "--config.loss.terms.ot.weight=0.5",
      "--config.num_steps=5", "--config.loss.head_decay=0.02"),
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  saved = inference.restore(str(tmp_path)).config
  assert saved.loss.terms.ot.weight == 0.5  # Not the method's weight.
  assert transfer.WEIGHTS["digits"]["ot"] != 0.5
  assert saved.loss.head_decay == 0.02  # The config sets common.DECAY.
  last = read_metrics(str(tmp_path), split="train")[-1]
  assert last["loss"] == pytest.approx(
      last["ce"] + 0.5 * last["reg/ot"] + last["weight_decay"]
      + last["head_decay"], rel=1e-5)


@pytest.mark.slow
def test_a_regularizer_defined_outside_the_package_trains(teacher_dir,
                                                          tmp_path):
  """The docs' "add your own regulariser" config, through experiments.main."""
  config_file = tmp_path / "my_config.py"
  config_file.write_text(doc_support.python_block("Add your own regulariser"))
  # The docs' config is full size: the smoke sizes on the command line (a
  # 300-step teacher job would retrain the session's shared 40-step one).
  student, teacher = TINY, TEACHER_TINY
  command = main_command(tmp_path / "run", teacher_dir, *(
      [f"--config.{k}={v}" for k, v in student.items()]
      + [f"--config.teacher.job.{k}={v}" for k, v in teacher.items()]))
  command[command.index("--config") + 1] = str(config_file)
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  last = read_metrics(str(tmp_path / "run"), split="train")[-1]
  gap = last["gap/mean_gap/stage3->stage3"]
  assert last["reg/mean_gap"] == pytest.approx(3.0 * gap**2, rel=1e-4)
  assert last["reg/mean_gap"] > 0
  assert last["loss"] == pytest.approx(  # And transfer.py's decays.
      last["ce"] + 2.0 * last["reg/mean_gap"] + last["weight_decay"]
      + last["head_decay"], rel=1e-5)


def test_unknown_method_lists_the_defined_ones(tmp_path):
  with pytest.raises(ValueError, match="choose one of .*'l2_sp'"):
    tiny_config(tmp_path, method="magic")


@pytest.mark.parametrize("method", ["ot", "l2_sp", "finetune"])
def test_teacher_dependent_methods_without_teacher_are_refused(tmp_path,
                                                               method):
  c = tiny_config(tmp_path / "none", method=method)
  c.teacher.source = "none"
  with pytest.raises(ValueError, match="needs a teacher"):
    loop.train_and_evaluate(c, str(tmp_path))


@pytest.mark.slow
def test_analysis_layer_typo_fails_before_training(teacher_dir, tmp_path):
  c = tiny_config(teacher_dir)
  c.analysis.layers = ("stage9",)
  with pytest.raises(ValueError, match="analysis.layers.*'stage9'"):
    loop.train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_cli_errors_are_one_message(teacher_dir, tmp_path):
  proc = subprocess.run(
      main_command(tmp_path, teacher_dir, method="magic"), cwd=REPO,
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "Unknown method 'magic'" in proc.stderr


def test_a_checkpoint_teacher_without_a_path_says_what_to_set(tmp_path):
  c = tiny_config(tmp_path / "teacher")
  c.teacher.source = "checkpoint"
  with pytest.raises(ValueError, match=r"needs teacher.path.*"
                     r"--config.teacher.path=DIR"):
    job.load_teacher(c, str(tmp_path))


def test_a_longer_teacher_job_is_another_run_for_the_student(tmp_path):
  saved = checkpoint.config_to_json(tiny_config(tmp_path))
  now = tiny_config(tmp_path, num_steps=40, log_every=2)
  now.teacher.job.log_every = 3
  now_json = checkpoint.config_to_json(now)
  assert same_run.resume_differences(saved, now_json) == []
  now.teacher.job.num_steps += 10  # Trains the cached teacher on.
  assert same_run.resume_differences(saved,
                                     checkpoint.config_to_json(now)) == [
      "teacher.job.num_steps: 40 -> 50"]


def test_a_key_one_side_lacks_counts_as_its_default(tmp_path):
  # A run saved before an option existed resumes as long as the option keeps
  # the old behaviour (its default); another value is another run.
  now = checkpoint.config_to_json(tiny_config(tmp_path))
  now["teacher_normalization"] = False  # The default (the config's is True).
  saved = json.loads(json.dumps(now))
  del saved["test_every_eval"], saved["teacher_normalization"]
  del saved["loss"]["terms"]["ot"]["options"]["solver"]
  del saved["teacher"]["job"]["init_permuted"]
  assert same_run.resume_differences(saved, now) == []
  now["teacher_normalization"] = True
  now["loss"]["terms"]["ot"]["options"]["solver"] = "batched"
  assert same_run.resume_differences(saved, now) == [
      "loss.terms.ot.options.solver: 'auto' -> 'batched'",
      "teacher_normalization: False -> True"]


def test_restore_without_checkpoints_says_what_to_do(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="train first"):
    inference.restore(str(tmp_path))


@pytest.mark.slow
def test_reproduce_writes_results_table_and_figures(teacher_dir, tmp_path,
                                                   monkeypatch):
  methods = ("scratch", "ot", "ot_uniform")
  configs = {m: tiny_config(teacher_dir, m) for m in methods}
  records, table = reproduce.run_all(configs, str(tmp_path), seeds=2,
                                     baseline="scratch")
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved == records and len(records) == 6
  assert [(r["method"], r["seed"]) for r in records] == [
      (m, s) for m in methods for s in (0, 1)]
  for r in records:
    for key in ("test_accuracy_best_val", "test_accuracy_last"):
      assert 0 <= r[key] <= 1
    assert r["hyperparameters"] == runs.hyperparameters(configs[r["method"]])
  assert "loss.terms.ot.weight" in records[-1]["hyperparameters"]
  assert "| scratch | 2 |" in table and "| ot | 2 |" in table
  for name in ("results.md", "learning_curves.png", "ot_plan.png",
               "matched_fraction_depth.png", "matched_fraction_training.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  paired = table.split("method − scratch (same seeds)")[-1]
  assert "| ot | 2 |" in paired and "| ot_uniform | 2 |" in paired
  # Omega_P against its control (common.contrasts), the second table.
  contrasts = table.split("| pair (same seeds) |")[-1]
  assert "| ot − ot_uniform | 2 |" in contrasts
  # A fresh checkout of what is committed (the records, with their configs,
  # the tables and figures; no workdir): a rerun trains nothing, reads no
  # run, and writes the same tables; the figures stay as they were.
  committed = tmp_path / "committed"
  shutil.copytree(tmp_path, committed, ignore=lambda d, names: [
      n for n in names if d == str(tmp_path) and n not in (
          "runs", "results.json", "results.md", "learning_curves.png")])
  figure = (committed / "learning_curves.png").read_bytes()

  def trains(*args, **kwargs):
    raise AssertionError("a committed record's run was trained again")

  monkeypatch.setattr(loop, "train_and_evaluate", trains)
  fresh = tmp_path / "fresh"
  again, table_again = reproduce.run_all(configs, str(fresh), seeds=2,
                                         baseline="scratch",
                                         out=str(committed))
  assert again == saved and table_again == table and not fresh.exists()
  assert json.load(open(committed / "results.json")) == saved
  md = open(committed / "results.md").read()
  assert md == open(tmp_path / "results.md").read().replace(
      "\n![ot_plan](ot_plan.png)\n", "").replace(
          "\n![matched_fraction_depth](matched_fraction_depth.png)\n", ""
      ).replace("\n![matched_fraction_training](matched_fraction_training"
                ".png)\n", "")  # Only the figures still there are linked.
  assert (committed / "learning_curves.png").read_bytes() == figure
  # A record of other settings is refused before any run (scratch's seed
  # 1, without its record now, would train first), naming the difference.
  os.remove(committed / "runs" / "scratch" / "seed1.json")
  configs["ot"].loss.terms.ot.weight *= 10
  with pytest.raises(ValueError, match=(
      r"seed0.json was made with other settings than this command builds: "
      r"loss.terms.ot.weight")):
    reproduce.run_all(configs, str(fresh), seeds=2, out=str(committed))
  # A run recorded now beside reused records (scratch's seed 1, from a copy
  # of the first call's finished workdir): no figure is linked, none
  # redrawn from the one run here.
  configs["ot"].loss.terms.ot.weight /= 10
  monkeypatch.undo()
  shutil.copytree(tmp_path / "scratch" / "seed1",
                  fresh / "scratch" / "seed1")
  _, table_mixed = reproduce.run_all(configs, str(fresh), seeds=2,
                                     baseline="scratch", out=str(committed))
  assert table_mixed == table and "![" not in open(
      committed / "results.md").read()
  assert (committed / "learning_curves.png").read_bytes() == figure


def test_figures_are_drawn_only_from_workdirs_that_hold_the_records_runs(
    tmp_path):
  record = {"test_accuracy_best_val": 0.8, "test_accuracy_last": 0.7,
            "best_step": 10, "step": 20}
  final = {"test_accuracy_at_best_val": 0.8, "test_accuracy": 0.7,
           "best_step": 10, "step": 20}
  assert not reproduce._holds(str(tmp_path), record)  # Not finished.
  runs.write_json(str(tmp_path / loop.FINAL_METRICS), final)
  assert reproduce._holds(str(tmp_path), record)
  runs.write_json(str(tmp_path / loop.FINAL_METRICS), {**final, "step": 30})
  assert not reproduce._holds(str(tmp_path), record)  # Another run.


def _clash(teacher_dir, method="scratch"):
  """``{method: config}``: the smoke digits job with its teacher trained with
  seed 0, a table seed."""
  c = tiny_config(teacher_dir, method)
  c.teacher.job.seed = 0
  return {method: c}


def test_reproduce_refuses_a_student_of_the_teachers_seed_before_any_run(
    tmp_path):
  root = tmp_path / "reproduce"
  with pytest.raises(ValueError, match=(
      r"scratch: seed 0 would initialise the student with the teacher's own "
      r"initial weights.*--config.teacher.job.seed=1000")):
    reproduce.run_all(_clash(tmp_path / "teacher"), str(root), seeds=2)
  assert not root.exists() and not (tmp_path / "teacher").exists()
  # From the teacher's weights, the same seeds run (not refused).
  reproduce.check_initialisations(_clash(tmp_path / "teacher", "l2_sp"),
                                  str(root), 2)


def test_reproduce_does_not_refuse_a_finished_run_it_reuses(tmp_path):
  # A rerun of a table already made trains nothing: its runs are reused.
  configs, root = _clash(tmp_path / "teacher"), str(tmp_path / "reproduce")
  finished = os.path.join(reproduce.run_workdir(root, "scratch", 0),
                          loop.FINAL_METRICS)
  os.makedirs(os.path.dirname(finished))
  runs.write_json(finished, {})
  reproduce.check_initialisations(configs, root, 3)  # Seeds 1, 2 left.
  os.remove(finished)
  with pytest.raises(ValueError, match="seed 0 would initialise"):
    reproduce.check_initialisations(configs, root, 3)
  # Nor one whose record is kept in --out (a committed table).
  out = str(tmp_path / "docs")
  (run, *_) = reproduce.planned(configs, root, 3, out)
  runs.write_json(run.path, {"config": checkpoint.config_to_json(run.config)})
  reproduce.check_initialisations(configs, root, 3, out)


def test_reproduce_cli_refuses_the_clash_in_one_error_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", "--config",
       f"experiments/configs/transfer.py:{ARG}", "--methods", "scratch,ot",
       "--seeds", "1", "--workdir", str(tmp_path / "work"),
       "--config.teacher.job.seed=0"],
      cwd=REPO, capture_output=True, text=True, check=False)
  errors = [l for l in result.stderr.splitlines() if l.startswith("Error:")]
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert len(errors) == 1, result.stderr
  assert errors[0] == (
      "Error: scratch: seed 0 would initialise the student with the teacher's "
      "own initial weights (same architecture, teacher.job.seed). Give the "
      "teacher another seed (--config.teacher.job.seed=1000 and a new "
      "teacher.workdir).")
  assert not (tmp_path / "work").exists()  # Nothing trained, nothing written.


@pytest.mark.parametrize("name", ["transfer", "distill", "cross_arch"])
def test_every_digits_method_has_a_config_whose_terms_parse(name):
  """Fast: the configs build and their loss terms parse (the slow test below
  trains each)."""
  module = runs.load_config_module(
      os.path.join(REPO, f"experiments/configs/{name}.py:data=digits"))
  methods = module.methods
  assert len(methods) >= 3 and module.get_config().method in methods
  for method in methods:
    config = module.get_config(method)
    assert config.method == method
    loss_terms = terms.terms_from_config(config.loss.terms)
    assert {t.name for t in loss_terms} == set(config.loss.terms)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["distill", "cross_arch"])
def test_every_digits_method_runs(name, tmp_path):
  module = runs.load_config_module(
      os.path.join(REPO, f"experiments/configs/{name}.py:data=digits"))
  assert f"experiments/configs/{name}.py:data=digits" in module.__doc__
  # Omega_P's controls are ot with one option changed (test_configs.py,
  # test_regimes.py): training them here adds run time, not coverage.
  for method in (m for m in module.methods if m not in common.OT_CONTROLS):
    config = module.get_config(method)
    config.update({"num_steps": 3, "eval_every": 3, "log_every": 1,
                   "checkpoint_every": 3})
    config.teacher.job.num_steps = 5
    config.teacher.workdir = str(tmp_path / "teacher")
    final = loop.train_and_evaluate(config, str(tmp_path / method))
    assert final["step"] == 3 and 0 <= final["test_accuracy"] <= 1
    last_train = read_metrics(str(tmp_path / method), split="train")[-1]
    for name in config.loss.terms:  # Every term is logged, and active.
      assert np.isfinite(last_train[f"reg/{name}"]), (method, name)
      assert last_train[f"reg/{name}"] > 0, (method, name)


@pytest.mark.slow
def test_terms_that_read_data_get_every_class(teacher_dir, monkeypatch):
  """DELTA's init fits a head on a class-balanced sample of the training set,
  knowing the task's classes, even when the data are sorted by class."""
  from experiments import job
  c = tiny_config(teacher_dir, method="scratch")
  c.data.samples_per_class = None  # ~500 images: more than the sample.
  monkeypatch.setattr(job, "TRAINING_SAMPLE", 100)
  ds = data.get_datasets(c.data)
  assert len(ds.train) > 2 * job.TRAINING_SAMPLE
  sorted_train = data.SubsetSource(ds.train, np.argsort(ds.train.labels,
                                                        kind="stable"),
                                   np.arange(ds.num_classes))
  ds = dataclasses.replace(ds, train=sorted_train)
  loss_terms = terms.terms_from_config(c.loss.terms)
  assert job._training_sample(ds, ds.mean, ds.std, c, loss_terms) == {
      "num_classes": ds.num_classes}  # No term reads data: no images.
  with c.unlocked():
    c.loss.terms.delta = common.term("delta", 0.1, student_layers=("stage2",))
  loss_terms = terms.terms_from_config(c.loss.terms)
  sample = job._training_sample(ds, ds.mean, ds.std, c, loss_terms)
  assert sample["num_classes"] == 5
  per_class = -(-job.TRAINING_SAMPLE // 5)
  np.testing.assert_array_equal(np.bincount(sample["labels"]), [per_class] * 5)
  assert sample["images"].shape == (len(sample["labels"]), 8, 8, 1)
