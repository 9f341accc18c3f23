"""Command-line user errors: one `Error:` line, exit 1, no traceback (nor a
background thread's), and the checks that run before a teacher is trained."""

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
