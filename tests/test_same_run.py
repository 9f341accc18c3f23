"""experiments.same_run: one table of keys, one diff, and every committed record.

The last test reads every record under docs/regimes and checks it against the
config its documented command builds now: the records stay the results of
their commands (a rerun trains nothing).
"""

import ast
import copy
import glob
import os
import re
import shlex

import pytest

from digits_job import REPO
from experiments import curve, runs, same_run
from experiments.configs import common, transfer
from ot_transfer_jax import checkpoint


def _config(method="ot"):
  return checkpoint.config_to_json(
      transfer.get_config(f"data=digits,method={method}"))


# --- The table ------------------------------------------------------------------


def test_every_key_of_the_table_is_a_key_of_the_base_config():
  # But the retired ones, which only older records and checkpoints hold.
  base = runs.flatten(checkpoint.config_to_json(common.base_config()))
  for key in same_run.KEYS:
    present = any(k == key or k.startswith(key + ".") for k in base)
    assert present == (key not in same_run.RETIRED), key
  assert set(same_run.KEYS.values()) == {same_run.RESUMABLE,
                                         same_run.RESULT_NEUTRAL}


def test_result_neutral_keys_may_differ_in_records_and_resumes():
  saved, now = _config(), _config()
  now.update(eval_batch_size=7, log_every=3, test_every_eval=False,
             max_devices=2)
  now["teacher"]["workdir"] = "elsewhere"
  now["data"]["data_dir"] = "/data"
  assert same_run.record_differences(saved, now) == []
  assert same_run.resume_differences(saved, now) == []


def test_resumable_keys_may_differ_in_a_resume_not_in_a_record():
  saved, now = _config(), _config()
  now.update(num_steps=saved["num_steps"] + 10, eval_every=3)
  now["analysis"]["layers"] = ["stage1"]
  assert same_run.resume_differences(saved, now) == []
  assert same_run.record_differences(saved, now) == [
      "analysis.layers: ['stage1', 'stage2', 'stage3'] -> ['stage1']",
      f"eval_every: {saved['eval_every']} -> 3",
      f"num_steps: {saved['num_steps']} -> {saved['num_steps'] + 10}"]


def test_any_other_key_is_another_run():
  saved, now = _config(), _config()
  now["seed"] = 1
  now["loss"]["terms"]["ot"]["options"]["relative_epsilon"] = 0.1
  expected = ["loss.terms.ot.options.relative_epsilon: 0.01 -> 0.1",
              "seed: 0 -> 1"]
  assert same_run.resume_differences(saved, now) == expected
  assert same_run.record_differences(saved, now) == expected


def test_a_teacher_jobs_keys_matter_only_where_they_change_its_weights():
  saved, now = _config(), _config()
  now["teacher"]["job"].update(eval_every=7, log_every=1, analysis={})
  assert same_run.record_differences(saved, now) == []
  steps = saved["teacher"]["job"]["num_steps"]
  now["teacher"]["job"]["num_steps"] += 10  # Trains the cached teacher on.
  now["teacher"]["job"]["seed"] = 5
  expected = [f"teacher.job.num_steps: {steps} -> {steps + 10}",
              f"teacher.job.seed: {common.TEACHER_SEED} -> 5"]
  assert same_run.record_differences(saved, now) == expected
  assert same_run.resume_differences(saved, now) == expected


# --- Keys on one side only -------------------------------------------------------


def test_a_base_config_key_on_one_side_counts_as_its_default():
  saved, now = _config(), _config()
  del saved["init_permuted"]  # A record made before the option existed.
  assert same_run.record_differences(saved, now) == []
  now["init_permuted"] = True
  assert same_run.record_differences(saved, now) == [
      "init_permuted: False -> True"]
  assert same_run.record_differences(now, saved) == [
      "init_permuted: True -> False"]


def test_the_run_config_holds_no_suite_metadata():
  # The suite (methods, order, baseline) is the config file's get_methods.
  config = _config()
  for key in same_run.RETIRED:
    assert key not in config and key not in config["teacher"]["job"]


def test_the_retired_suite_metadata_of_older_records_is_the_same_run():
  # method_order and baseline_method describe a results table: a record or
  # checkpoint that has them (configs wrote them until they moved to the
  # config file) matches a config that no longer does, whatever they say.
  saved, now = _config(), _config()
  for job in (saved, saved["teacher"]["job"]):
    job.update(method_order=["scratch", "ot"], baseline_method="scratch")
  assert same_run.record_differences(saved, now) == []
  assert same_run.resume_differences(saved, now) == []
  assert same_run.resume_differences(now, saved) == []


def test_a_term_option_on_one_side_counts_as_the_regularisers_default():
  saved, now = _config(), _config()
  del saved["loss"]["terms"]["ot"]["options"]["tau"]  # Older code.
  assert same_run.record_differences(saved, now) == []
  now["loss"]["terms"]["ot"]["options"]["tau"] = 0.5
  assert same_run.record_differences(saved, now) == [
      "loss.terms.ot.options.tau: 1.0 -> 0.5"]


def test_a_key_the_code_no_longer_has_inside_a_shared_term_is_ignored():
  # term_config writes every field and option: a key there on one side only
  # was added or retired by a code change, not chosen by the run.
  saved, now = _config(), _config()
  saved["loss"]["terms"]["ot"]["options"]["retired_option"] = 3
  saved["loss"]["terms"]["ot"]["start_step"] = 0
  assert same_run.record_differences(saved, now) == []
  assert same_run.resume_differences(now, saved) == []


def test_a_term_or_model_kwarg_on_one_side_only_is_another_run():
  scratch, ot = _config("scratch"), _config("ot")
  scratch["method"] = "ot"  # Only the term tells them apart.
  for key in ("init_from_teacher", "model", "loss"):
    scratch[key] = copy.deepcopy(ot[key])
  del scratch["loss"]["terms"]["ot"]
  (difference,) = same_run.record_differences(scratch, ot)
  assert difference.startswith(
      "loss.terms.ot: (absent) -> {'regularizer': 'ot', 'weight': "
      f"{transfer.WEIGHTS['digits']['ot']!r}")
  wider = _config()
  wider["model"]["kwargs"] = {"width": 0.5}  # The model's default unknown.
  assert same_run.resume_differences(_config(), wider) == [
      "model.kwargs.width: (absent) -> 0.5"]


def test_teacher_name_counts_only_where_the_teacher_source_reads_it():
  # A trained teacher's network is teacher.job.model: records and checkpoints
  # that wrote teacher.name before it was retired there are the same run.
  saved, now = _config(), _config()
  assert now["teacher"]["source"] == "train"
  saved["teacher"]["name"] = "small_cnn"
  assert same_run.record_differences(saved, now) == []
  assert same_run.resume_differences(saved, now) == []
  del saved["teacher"]["name"]
  assert same_run.record_differences(now, saved) == []
  # A torchvision or random teacher is built from teacher.name.
  for source in ("random", "torchvision"):
    saved, now = _config(), _config()
    saved["teacher"]["source"] = now["teacher"]["source"] = source
    now["teacher"]["name"] = "resnet50"
    assert same_run.record_differences(saved, now) == [
        "teacher.name: 'digits_cnn' -> 'resnet50'"]
    now["teacher"]["source"] = "train"  # One side reads it: it counts.
    assert "teacher.name: 'digits_cnn' -> 'resnet50'" in (
        same_run.resume_differences(saved, now))


# --- Every committed record ------------------------------------------------------


def _documented_curve_commands() -> list:
  """The ``experiments.curve`` commands of docs/experiments.md and of the
  config files' docstrings, as argv lists (the usage line, with optional
  ``[--flags]``, left out)."""
  texts = [open(os.path.join(REPO, "docs", "experiments.md")).read()]
  for path in glob.glob(os.path.join(REPO, "experiments", "configs", "*.py")):
    texts.append(ast.get_docstring(ast.parse(open(path).read())) or "")
  commands = []
  for text in texts:
    for match in re.finditer(r"python -m experiments\.curve((?:.*\\\n)*.*)",
                             text):
      if "[--" not in match.group(0):
        commands.append(shlex.split(match.group(1).replace("\\\n", " ")))
  return commands


def _study(out: str):
  """The documented command whose ``--out`` is ``out``, as a Curve over the
  values that have records (the first-protocol studies stopped part way:
  a value without records would need runs the teacher-seed check now refuses
  to start), and its overrides."""
  # The docs and the config's docstring give the same command (and the
  # same with --every_weight: more runs of the same study).
  (argv,) = {tuple(a for a in argv if a != "--every_weight")
             for argv in _documented_curve_commands()
             if argv[argv.index("--out") + 1] == out}
  opt = lambda name, default=None: (argv[argv.index(name) + 1]
                                    if name in argv else default)
  key = opt("--key")
  recorded = {path.split(os.sep)[-1] for path in glob.glob(
      os.path.join(REPO, out, "*", "*"))}
  values = [v for v in curve.parse_values(opt("--values").split(","))
            if curve.label(key, v) in recorded]
  overrides = dict(a[len("--config."):].split("=", 1) for a in argv
                   if a.startswith("--config."))
  return curve.Curve(
      runs.load_config_module(os.path.join(REPO, opt("--config"))), key,
      values, opt("--methods", "").split(",") if opt("--methods") else None,
      int(opt("--seeds", 3)), os.path.join(REPO, out), "/nonexistent",
      overrides, [int(t) for t in opt("--tuning_seeds", "100,101").split(",")],
      curve.parse_grids([opt("--grid")] if opt("--grid") else []),
      int(opt("--extensions", 2)), opt("--focus", "ot"))


STUDIES = sorted(os.path.relpath(os.path.dirname(d), REPO) for d in glob.glob(
    os.path.join(REPO, "docs", "regimes", "*", "runs")))


def test_the_committed_studies_are_found():
  assert {"docs/regimes/data_scarcity", "docs/regimes/initialisation",
          "docs/regimes/student_size"} <= set(STUDIES)


@pytest.mark.parametrize("out", STUDIES)
def test_every_committed_record_is_the_run_its_command_builds_now(
    out, monkeypatch):
  study = _study(out)

  def no_training(run):
    raise AssertionError(f"a committed study would train: {run.path}")

  monkeypatch.setattr(study, "_train", no_training)
  checked = set()
  paths = sorted(glob.glob(os.path.join(REPO, out, "*", "**", "seed*.json"),
                           recursive=True))
  for path in paths:
    record = runs.read_json(path)
    value, method, seed = record["value"], record["method"], record["seed"]
    label = curve.label(study.key, value)
    if record["kind"] == "tuning":
      wkey = study.grids[method][0]
      weight = record["weights"].get(wkey, runs.flatten(record["config"])[wkey])
      assert path == study._tuning_path(label, method, weight, seed)
    elif record["kind"] == "every_weight":  # curve --every_weight.
      weight = record["weight"]
      assert path == study._weight_path(label, method, weight, seed)
      # A run results.json lists: the baseline or a weight of the final
      # grid, a table seed (not a leftover of an earlier grid or --seeds).
      if weight is None:
        assert method == study.methods[0] not in study.grids, path
      else:
        assert weight in study.tune(value, method)["grid"], path
      assert 0 <= seed < study.seeds, path
    else:
      assert path == study._run_path(label, method, seed)
      weight = None
      if method in study.grids:  # Chosen from the committed tuning records.
        weight = study.tune(value, method)["weight"]
    cfg = study.seeded(study.at(method, value, weight), seed, label)
    assert same_run.record_differences(
        record["config"], checkpoint.config_to_json(cfg)) == [], path
    checked.add(path)
  # A study part way (records committed as they finish) has only some.
  assert paths and len(checked) == len(paths)
