"""Command-line user errors: one `Error:` line, exit 1, no traceback (nor a
background thread's), and the checks that run before a teacher is trained."""

import json
import os
import re
import subprocess

import pytest

from experiments import loop

from digits_job import REPO, main_command, tiny_config


def _run(args, timeout=180):
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize("case", [
    "missing_config",
    *(pytest.param(case, marks=pytest.mark.slow) for case in (
        "workdir_is_a_file", "bad_augment", "unknown_tfds_name"))])
def test_user_errors_are_one_line_without_traceback(case, tmp_path):
  # Each error comes before the teacher trains: it needs none.
  teacher_dir = tmp_path / "teacher"
  workdir = tmp_path / "run"
  extra, expected = {
      "missing_config": ([], r"--config .*nope\.py: no such file"),
      "workdir_is_a_file": ([], r"--workdir .* is a file, not a directory"),
      "bad_augment": (["--config.augment=flip"],
                      r"augment must be one of .*got 'flip'"),
      "unknown_tfds_name": (["--config.data.name=cifar1000"],
                            r"not a known dataset\. Did you mean 'cifar100'"),
  }[case]
  command = main_command(workdir, teacher_dir, *extra)
  if case == "missing_config":
    command[command.index("--config") + 1] = str(tmp_path / "nope.py")
  if case == "workdir_is_a_file":
    workdir.write_text("")
  proc = _run(command)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = _error_lines(proc.stderr)
  assert len(errors) == 1, proc.stderr[-3000:]
  assert re.search(expected, errors[0]), errors[0]
  # The error ends the output: no catalogue or thread dump after it.
  assert proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
  assert not teacher_dir.exists()


@pytest.mark.slow  # A subprocess; tests/test_configs.py checks the error fast.
def test_a_bad_config_argument_is_one_error_line(tmp_path):
  # file.py:ARG reaches get_config; its ValueError is the message (exit 2,
  # like any bad flag), naming the datasets there are. Nothing is trained.
  command = main_command(tmp_path / "run", tmp_path / "teacher")
  index = command.index("--config") + 1
  command[index] = command[index].replace("data=digits", "data=cifar10")
  proc = _run(command)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  (error,) = _error_lines(proc.stderr)
  assert re.search(r"Unknown data='cifar10'.*'digits', 'fashion_mnist'",
                   error), error
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,expected", [
    ({"student_layers": ("stage1", "stage9", "stage3")},
     r"unknown layer 'stage9' \(did you mean 'stage3'\?\)"),
    ({"options.relative_epsilon": -1.0},
     "relative_epsilon must be a positive finite number"),
    ({"options.spatial": "pooled"}, r"spatial='pooled' is not one of"),
])
def test_student_and_loss_errors_come_before_the_teacher_trains(
    override, expected, tmp_path):
  config = tiny_config(tmp_path / "teacher")
  with config.unlocked():
    for key, value in override.items():
      node = config.loss.terms.ot
      *parents, leaf = key.split(".")
      for parent in parents:
        node = node[parent]
      node[leaf] = value
  with pytest.raises(ValueError, match=expected):
    loop.train_and_evaluate(config, str(tmp_path / "student"))
  assert not (tmp_path / "teacher").exists()  # No teacher step was taken.


@pytest.mark.slow
def test_resume_with_other_data_is_refused_then_allowed_as_a_new_section(
    teacher_dir, tmp_path):
  config = tiny_config(teacher_dir, num_steps=10, checkpoint_every=10)
  loop.train_and_evaluate(config, str(tmp_path))
  other = tiny_config(teacher_dir, num_steps=20, checkpoint_every=10)
  other.data.classes = (0, 1, 2, 3, 4)
  with pytest.raises(ValueError,
                     match=r"holds a run with other settings \(checkpoint of "
                     r"step 10\): data\.classes: \[5, 6, 7, 8, 9\] -> \[0, 1, "
                     r"2, 3, 4\]\. Use a new --workdir .*"
                     r"allow_resume_with_changes=True"):
    loop.train_and_evaluate(other, str(tmp_path))
  with other.unlocked():
    other.allow_resume_with_changes = True
  final = loop.train_and_evaluate(other, str(tmp_path))
  # Model selection restarted at the resumed step: nothing from step 10.
  assert final["history_from_step"] == 10
  assert final["best_step"] == 20 and final["step"] == 20


@pytest.mark.slow
def test_harmless_changes_resume(teacher_dir, tmp_path):
  config = tiny_config(teacher_dir, num_steps=10, checkpoint_every=10)
  first = loop.train_and_evaluate(config, str(tmp_path))
  longer = tiny_config(teacher_dir, num_steps=20, checkpoint_every=10,
                       log_every=2, eval_every=5)
  final = loop.train_and_evaluate(longer, str(tmp_path))
  assert final["step"] == 20 and final["history_from_step"] == 0
  assert final["best_val_accuracy"] >= first["best_val_accuracy"]


@pytest.mark.slow
def test_the_default_job_says_what_it_trains_and_where_its_outputs_are(
    tmp_path):
  """The CLI as a user runs it: no --workdir (the default one, under the
  current directory), a teacher trained first, JAX free to probe for
  accelerators (JAX_PLATFORMS unset: on a machine without a TPU, jax logs
  "Unable to initialize backend 'tpu'" at INFO, which must not show)."""
  command = [c for c in main_command("unused", tmp_path / "teacher")
             if not c.startswith("--workdir")]
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = REPO  # The experiments package, from another folder.
  proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  err, out = proc.stderr, proc.stdout.splitlines()
  # smoke=True has its own default workdir: never a real run's.
  workdir = os.path.join("workdirs", "main", "digits_smoke_transfer", "ot")
  # A header per phase, the validation accuracy at each evaluation (teacher:
  # 40 steps, eval_every 100 -> step 40; student: steps 10 and 20).
  assert re.search(r"Training the teacher \(model digits_cnn, seed 1000; 40 "
                   rf"steps\) in {re.escape(str(tmp_path / 'teacher'))}", err)
  assert re.search(r"Training the student \(method ot, model digits_cnn, "
                   rf"seed 0; 20 steps\) in {re.escape(workdir)}\n", err)
  vals = re.findall(r"step (\d+)/(\d+) \| val accuracy 0\.\d{4} \| best", err)
  assert vals == [("40", "40"), ("10", "20"), ("20", "20")], err[-3000:]
  teacher_final = next(l for l in err.splitlines()
                       if "Final metrics of the teacher" in l)
  assert "'method'" not in teacher_final
  assert "Unable to initialize backend" not in err
  # The closing block: where each output is, each of which exists.
  start = out.index(f"Outputs in {workdir}:")
  for name in ("final_metrics.json", "metrics.jsonl", "tensorboard/",
               "checkpoints/", "analysis.json"):
    assert any(l.split()[0] == name for l in out[start + 1:-1]), out
    assert (tmp_path / workdir / name.rstrip("/")).exists(), name
  assert f"  teacher:            {tmp_path / 'teacher'}" in out
  # The last line: the test accuracy at the best validation step first.
  with open(tmp_path / workdir / "final_metrics.json") as f:
    final = json.load(f)
  assert out[-1] == (
      f"ot, seed 0: test accuracy {final['test_accuracy_at_best_val']:.4f} "
      f"at the best validation step {final['best_step']} (val accuracy "
      f"{final['best_val_accuracy']:.4f}); at the last step (20): "
      f"{final['test_accuracy']:.4f}")


def test_default_workdirs_of_the_tools_never_nest():
  """main, reproduce, sweep and curve each default to their own root: none
  is inside another's (reproduce used to train in main's workdir)."""
  from experiments import cli
  configs = ["experiments/configs/transfer.py:data=digits",
             "experiments/configs/transfer.py:data=fashion_mnist,method=ot",
             "experiments/configs/distill.py:data=digits",
             "experiments/configs/transfer.py:data=digits,smoke=True",
             "experiments/configs/cifar100.py:pair=resnet56_resnet20"]
  roots = {("main", c, m): cli.default_workdir(c, m)
           for c in configs for m in ("ot", "scratch")}
  roots.update({(tool, c, None): cli.default_root(tool, c)
                for tool in ("reproduce", "sweep", "curve") for c in configs})
  assert cli.default_workdir(configs[0], "ot") == os.path.join(
      "workdirs", "main", "digits_transfer", "ot")
  assert cli.default_root("reproduce", configs[1]) == os.path.join(
      "workdirs", "reproduce", "fashion_mnist_transfer")
  assert cli.default_workdir(configs[3], "ot") == os.path.join(
      "workdirs", "main", "digits_smoke_transfer", "ot")
  assert cli.config_name("experiments/configs/transfer.py:data=digits,"
                         "smoke=False") == "digits_transfer"
  for a, root_a in roots.items():
    for b, root_b in roots.items():
      if a[0] != b[0]:  # Two tools: disjoint trees.
        assert not (root_a + os.sep).startswith(root_b + os.sep), (a, b)
