"""experiments.curve: values, tables, records, resumption and errors (the
weight choice itself: tests/test_runs.py).

The end-to-end test runs the tool from its flags on the tiny digits job (2
values, 1 seed, a one-point weight grid, 20 steps) and checks the outputs'
structure and that a rerun of the command it recorded trains nothing, not its
numbers.
"""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from absl import flags
from ml_collections.config_flags import config_path

from digits_job import ARG, REPO, without_sweep
from experiments import curve, loop, runs
from experiments.configs import common

DIGITS = without_sweep(runs.load_config_module(
    os.path.join(REPO, "experiments/configs/transfer.py:data=digits")))
# The same config at smoke sizes (20 steps, a 40-step teacher).
DIGITS_SMOKE = without_sweep(runs.load_config_module(
    os.path.join(REPO, f"experiments/configs/transfer.py:{ARG}")))

KEY = "data.samples_per_class"


# --- Values, records, tables ---------------------------------------------------


def test_parse_values_reads_literals_and_refuses_repeats():
  assert curve.parse_values(["2", "0.5", "True", "adam"]) == [2, 0.5, True,
                                                              "adam"]
  with pytest.raises(ValueError, match="repeats"):
    curve.parse_values(["2", "2"])
  with pytest.raises(ValueError, match="empty"):
    curve.parse_values([])


def test_paired_differences_are_per_seed_in_points():
  records = [{"method": m, "seed": s, "status": "finished",
              "test_accuracy_best_val": a}
             for m, s, a in (("ot", 0, 0.52), ("ot", 1, 0.53), ("ot", 2, 0.9),
                             ("scratch", 0, 0.51), ("scratch", 1, 0.50))]
  mean, se, better, n = curve.paired(records, "ot", "scratch")
  assert n == 2 and better == 2  # Seed 2 has no scratch run.
  assert mean == pytest.approx(2.0) and se == pytest.approx(1.0)


def test_interaction_is_the_paired_change_of_the_focus_gap():
  # Seed s: ot - scratch is 1 + s points at width 1.0 and 3 + 2 s at 0.25,
  # so the gap grows by 2 + s (seeds 0, 1: mean 2.5, s.e. 0.5).
  acc = {(1.0, "ot"): (0.60, 0.61), (1.0, "scratch"): (0.59, 0.59),
         (0.25, "ot"): (0.55, 0.57), (0.25, "scratch"): (0.52, 0.52)}
  key = "model.kwargs.width"
  records = [{"label": curve.label(key, v), "method": m, "seed": s,
              "status": "finished", "test_accuracy_best_val": a[s],
              "test_accuracy_last": a[s] - 0.01 * (m == "ot")}
             for (v, m), a in acc.items() for s in (0, 1)]
  summary = {"key": key, "values": [1.0, 0.25], "focus": "ot",
             "methods": ["scratch", "ot"]}
  by_value = curve._by_value(records, [curve.label(key, v)
                                       for v in summary["values"]])
  lines = curve.interactions(summary, by_value)
  (row,) = [line for line in lines if line.startswith("| ot − scratch")]
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[1:] == ["0.25 − 1.0", "2", "+2.50", "0.50", "2/2",
                       "+2.50", "0.50", "2/2"]


# Every committed study with results, the first protocol's included.
COMMITTED = sorted(
    os.path.dirname(p) for p in glob.glob(
        os.path.join(REPO, "docs", "regimes", "*", "results.json")))


@pytest.mark.parametrize("folder", COMMITTED, ids=os.path.basename)
def test_committed_results_md_is_what_curve_writes_from_its_json(folder):
  # A rerun of the study's command (records reused) rewrites results.md from
  # results.json: the committed one is already that (tables added to curve
  # since reach it too).
  summary = runs.read_json(os.path.join(folder, "results.json"))
  with open(os.path.join(folder, "results.md"), encoding="utf-8") as f:
    assert f.read() == curve.markdown(summary)


def test_some_committed_study_is_checked():
  assert len(COMMITTED) >= 2


# --- Errors, before any run ----------------------------------------------------


# transfer.py's digits methods (a scratch student at a table seed of its
# teacher's, runs.check_initialisation, is refused: see below).
def _curve(tmp_path, key=KEY, values=(3, 5), methods=("l2_sp", "ot"),
           module=DIGITS, **kwargs):
  return curve.Curve(module, key, list(values), list(methods),
                     kwargs.pop("seeds", 1), str(tmp_path / "out"),
                     str(tmp_path / "work"), kwargs.pop("overrides", {}),
                     **kwargs)


@pytest.mark.parametrize("case,match", [
    (dict(key="data.samples_per_clas"), "did you mean data.samples_per_class"),
    (dict(values=(3, 2.5)), "samples_per_class=2.5 does not fit"),
    (dict(methods=("scratch", "otp")), r"Unknown methods \['otp'\]"),
    (dict(seeds=5, tuning_seeds=(100, 3)), "tuning_seeds 3 is one of the"),
    (dict(tuning_seeds=(100, 100)), "distinct seeds"),
    (dict(methods=("scratch", "l2_sp")), "--focus ot is not one of"),
    (dict(focus="ot,otp"), r"--focus otp is not one of the methods "
     r"\['l2_sp', 'ot'\]"),
    (dict(focus=["l2_sp", "ot", "l2_sp"]), "--focus l2_sp,ot,l2_sp repeats"),
    (dict(focus=""), "names no method"),
    (dict(focus=[]), "names no method"),  # absl: --focus ''
    (dict(grids={"ot": (0.1,), "scratch": (1.0,)}), "scratch is not one of"),
    # runs.check_initialisation: a teacher seed that is a table seed.
    (dict(methods=("scratch", "ot"), overrides={"teacher.job.seed": 0}),
     r"scratch at samples_per_class=3: seed 0 would initialise the student "
     r"with the teacher's own initial weights .*"
     r"--config.teacher.job.seed=1000"),
    (dict(methods=("finetune", "ot"), grids={"finetune": (0.1,)}),
     r"(?s)finetune sets loss.terms.finetune.weight.*its terms: \[\]"
     ".*SWEEP or get_sweep"),
])
def test_bad_input_fails_before_any_run(tmp_path, case, match):
  with pytest.raises(ValueError, match=match):
    _curve(tmp_path, **case)
  assert not (tmp_path / "work").exists()


def test_a_grid_sets_the_one_term_of_a_method_without_a_listed_grid(tmp_path):
  # ot_uniform is the ot term with other options: no grid of its own in
  # transfer.py, so --grid ot_uniform=... sets loss.terms.ot.weight.
  study = _curve(tmp_path, methods=("l2_sp", "ot", "ot_uniform"),
                 grids={"ot_uniform": (0.1, 1.0)})
  assert study.grids["ot_uniform"] == ("loss.terms.ot.weight", (0.1, 1.0))
  assert study.at("ot_uniform", 3, 1.0).loss.terms.ot.weight == 1.0


@pytest.mark.parametrize("flag,message", [
    (["--key", "data.nope"], "--key data.nope"),
    (["--key", KEY, "--focus", "ot,otp"], "--focus otp is not one of the "
     "methods ["),
], ids=["key", "focus"])
def test_cli_error_is_one_line(tmp_path, flag, message):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.curve", "--config",
       "experiments/configs/transfer.py:data=digits", *flag,
       "--values", "3,5", "--out", str(tmp_path / "out")],
      cwd=REPO, capture_output=True, text=True, check=False)
  errors = [l for l in result.stderr.splitlines() if l.startswith("Error:")]
  assert result.returncode == 1
  assert len(errors) == 1 and message in errors[0], result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


def test_reproduce_refuses_curve_flags(tmp_path):
  # --key/--values are the curve's and the sweep's flags: reproduce refuses
  # them, naming the tools, rather than absl's unknown-flag message.
  result = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", "--config",
       "experiments/configs/transfer.py:data=digits", "--key",
       "data.samples_per_class", "--values", "3,5", "--workdir",
       str(tmp_path / "work")],
      cwd=REPO, capture_output=True, text=True, check=False)
  errors = [l for l in result.stderr.splitlines() if l.startswith("Error:")]
  assert result.returncode == 1
  assert len(errors) == 1 and "experiments.curve" in errors[0], result.stderr
  assert not (tmp_path / "work").exists()


# --- End to end ----------------------------------------------------------------


def _parsed(argv):
  """curve's flags parsed from ``argv`` (the program's name first) into
  flags of their own, as ``python -m experiments.curve`` parses them."""
  opts = flags.FlagValues()
  curve.define_flags(opts, argv)
  opts(argv)
  return opts


def _reread(command):
  """The flags of a recorded ``python -m experiments.curve ...`` command."""
  words = shlex.split(command)
  assert words[:3] == ["python", "-m", "experiments.curve"]
  return _parsed(["curve", *words[3:]])


@pytest.mark.slow
def test_curve_writes_records_and_a_rerun_trains_nothing(tmp_path, teacher_dir,
                                                        monkeypatch):
  overrides = {"teacher.workdir": str(teacher_dir)}
  # The protocol's pieces: two tuning seeds, both reads, the no-matching
  # control beside Omega_P.
  # finetune has no grid in the config file's SWEEP (l2_sp's would train it).
  grids = {"ot": (0.1,), "ot_uniform": (0.1,)}
  methods = ("finetune", "ot", "ot_uniform")
  out, work = tmp_path / "out", tmp_path / "work"
  config = os.path.join(REPO, f"experiments/configs/transfer.py:{ARG}")
  # From the flags, as main: the default tuning seeds 100, 101.
  study = curve.from_flags(_parsed([
      "curve", "--config", config, "--key", KEY, "--values", "3,5",
      "--seeds", "1", "--methods", ",".join(methods), "--grid", "ot=0.1",
      "--grid", "ot_uniform=0.1", f"--config.teacher.workdir={teacher_dir}",
      "--out", str(out), "--workdir", str(work)]))
  summary = study.run()
  # The command that made it, canonical: flags at their defaults left out.
  command = ("python -m experiments.curve " + " ".join(map(shlex.quote, [
      "--config", config, "--key", KEY, "--values", "3,5", "--seeds", "1",
      "--methods", "finetune,ot,ot_uniform", "--grid", "ot=0.1", "--grid",
      "ot_uniform=0.1", f"--config.teacher.workdir={teacher_dir}", "--out",
      str(out), "--workdir", str(work)])))
  assert json.loads((out / "results.json").read_text())["command"] == command
  assert (f"it trains only what is missing):\n\n```bash\n"
          f"{curve.command_lines(command)}\n```\n"
          in (out / "results.md").read_text())
  # Read back, the command is the same flags.
  assert curve.command(_reread(command)) == command
  assert [(r["value"], r["method"], r["seed"]) for r in summary["runs"]] == [
      (v, m, 0) for v in (3, 5) for m in methods]
  for r in summary["runs"]:
    assert r["status"] == "finished" and r["kind"] == "run"
    assert 0 <= r["test_accuracy_best_val"] <= 1 and r["wall_s"] >= 0
    assert 0 <= r["test_accuracy_last"] <= 1
    for measure in runs.PLAN_MEASURES:
      assert set(r[measure]) == set(common.LAYERS)
    assert all(0 < v <= 1 + 1e-6 for v in r["row_max_mass"].values())
    if r["method"] in ("ot", "ot_uniform"):
      assert r["weights"]["loss.terms.ot.weight"] == 0.1
    record = json.loads((out / "runs" / f"samples_per_class={r['value']}" /
                         r["method"] / "seed0.json").read_text())
    assert record["config"]["data"]["samples_per_class"] == r["value"]
    # The control is Omega_P with an epsilon that makes its plan uniform.
    eps = record["config"]["loss"]["terms"].get("ot", {}).get(
        "options", {}).get("relative_epsilon")
    assert (eps == 1e4) == (r["method"] == "ot_uniform")
  for label in ("samples_per_class=3", "samples_per_class=5"):
    choice = summary["chosen"][label]["ot"]
    assert choice["weight"] == 0.1 and not choice["bracketed"]
    # The choice reads the mean validation accuracy of both tuning seeds.
    tuned = [json.loads((out / "tuning" / label / "ot" / "ot.weight=0.1" /
                         f"seed{t}.json").read_text()) for t in (100, 101)]
    assert [t["seed"] for t in tuned] == [100, 101]
    assert choice["grid"]["0.1"] == pytest.approx(
        sum(t["val_accuracy_best"] for t in tuned) / 2)
  assert json.loads((out / "results.json").read_text())["runs"] == json.loads(
      json.dumps(summary["runs"]))
  md = (out / "results.md").read_text()
  assert md.count("| ot − finetune | 1 |") == 2  # Both reads on each row.
  assert md.count("| ot − ot_uniform | 1 |") == 2
  assert "| pair | n | best val: mean | s.e. | better | last: mean |" in md
  assert "row-max mass" in md and "tuning seeds 100, 101" in md
  # Each method along the key, paired by seed, at both reads.
  assert re.search(r"\| ot \| 5 − 3 \| 1 \| [-+]\d", md)
  assert "a grid of one value brackets nothing" in md
  assert (out / "curve.png").stat().st_size > 0
  # The teacher every run read, recorded beside the records and in the table.
  final = json.loads((teacher_dir / "final_metrics.json").read_text())
  teachers = json.loads((out / "teachers.json").read_text())
  assert list(teachers) == [str(teacher_dir)] == list(summary["teachers"])
  (entry,) = teachers[str(teacher_dir)]
  assert entry["model"] == "digits_cnn"
  assert (entry["step"], entry["test_accuracy"]) == (final["step"],
                                                     final["test_accuracy"])
  assert (f"Teacher `{teacher_dir}` (digits_cnn {{}}): test accuracy "
          f"{100 * final['test_accuracy']:.2f} % at its last step "
          f"{final['step']}") in md
  # A retrained teacher (another machine) is listed beside the first.
  other = dict(summary, teachers={str(teacher_dir): [
      entry, {**entry, "test_accuracy": 0.5}]})
  assert (f"{100 * final['test_accuracy']:.2f} / 50.00 % at its last step"
          in curve.markdown(other))
  assert "trained 2 times" in curve.markdown(other)

  # The recorded command on the committed records alone (no workdir)
  # trains nothing.
  def no_training(*args, **kwargs):
    raise AssertionError(f"retrained {args[1]}")

  monkeypatch.setattr(loop, "train_and_evaluate", no_training)
  shutil.rmtree(work)
  assert curve.from_flags(_reread(command)).run()["runs"] == summary["runs"]
  assert json.loads((out / "teachers.json").read_text()) == teachers

  # Records made with other settings are refused, naming the difference.
  with pytest.raises(ValueError, match="num_steps: 20 -> 10"):
    _curve(tmp_path, module=DIGITS_SMOKE,
           overrides={**overrides, "num_steps": 10}, methods=methods,
           tuning_seeds=(100, 101), grids=grids).run()


# --- The command a study records ---------------------------------------------


def test_the_command_is_one_canonical_form_of_the_flags():
  # The same study typed two ways: flag order, --flag=value, spaces after
  # commas, defaults given, overrides in another order.
  config = os.path.join(REPO, f"experiments/configs/transfer.py:{ARG}")
  typed = [
      ["curve", "--config", config, "--key", KEY, "--values", "3,5",
       "--grid", "ot=0.1,1.0", "--config.num_steps=20",
       "--config.teacher.workdir=/tmp/a teacher", "--out", "out dir"],
      ["curve", f"--config={config}", "--config.teacher.workdir=/tmp/a "
       "teacher", "--config.num_steps=20", "--out=out dir", "--focus=ot",
       "--seeds=3", "--extensions", "2", "--tuning_seeds", "100, 101",
       "--values", "3, 5", "--key", KEY, "--grid=ot=0.1,1"]]
  commands = {curve.command(_parsed(argv)) for argv in typed}
  assert commands == {
      f"python -m experiments.curve --config {config} --key {KEY} --values "
      "3,5 --seeds 3 --grid ot=0.1,1 --config.num_steps=20 "
      "'--config.teacher.workdir=/tmp/a teacher' --out 'out dir' --workdir "
      "workdirs/curve/digits_smoke_transfer"}
  (command,) = commands
  assert curve.command(_reread(command)) == command
  # Each flag that changes what runs, where not at its default.
  other = curve.command(_parsed(typed[0] + [
      "--methods", "l2_sp,ot", "--focus", "l2_sp", "--tuning_seeds",
      "102,103", "--extensions", "0", "--every_weight", "--workdir", "w"]))
  assert ("--seeds 3 --methods l2_sp,ot --focus l2_sp --grid ot=0.1,1 "
          "--tuning_seeds 102,103 --extensions 0 --every_weight "
          "--config.num_steps=20") in other and other.endswith("--workdir w")
  assert curve.command(_reread(other)) == other


def test_the_command_keeps_several_focus_methods_in_their_order():
  # The order is the page's: ot_kd's pairs first, then ot's.
  config = os.path.join(REPO, f"experiments/configs/transfer.py:{ARG}")
  argv = ["curve", "--config", config, "--key", KEY, "--values", "3",
          "--out", "o"]
  for typed, written in (("ot_kd, ot", "ot_kd,ot"), ("ot,ot_kd", "ot,ot_kd"),
                         ("ot", None)):
    command = curve.command(_parsed(argv + ["--focus", typed]))
    if written is None:  # The default: not written.
      assert "--focus" not in command
    else:
      assert f" --focus {written} " in command
    reread = _reread(command)
    assert reread.focus == (written or "ot").split(",")
    assert curve.command(reread) == command


def _config_json(opts):
  """The config ``--config`` and its overrides built, as JSON."""
  return opts["config"].value.to_json(sort_keys=True)


SEED = "--config.teacher.job.seed=1000"  # Not a student's (Curve refuses).


@pytest.mark.parametrize("config,typed,canonical", [
    # Two keys sharing a FieldReference: the later one typed sets both, so
    # the values as typed, sorted, would set both to True.
    ("first_regimes.py:study=initialisation",
     ["--config.model.freeze_batchnorm=True",
      "--config.init_from_teacher=False", SEED],
     ["--config.init_from_teacher=False",
      "--config.model.freeze_batchnorm=False", SEED]),
    ("first_regimes.py:study=initialisation",
     [SEED, "--config.init_from_teacher=False",
      "--config.model.freeze_batchnorm=True"],
     ["--config.init_from_teacher=True",
      "--config.model.freeze_batchnorm=True", SEED]),
    # A child after its parent: the parent's final value holds it. (A parent
    # after its child ml_collections refuses.)
    ("regimes.py:study=width",
     ["--config.num_steps=7", "--config.model.kwargs={'width': 1.0}",
      "--config.model.kwargs.width=0.5"],
     ["--config.model.kwargs={'width': 0.5}", "--config.num_steps=7"]),
], ids=["reference_later", "reference_earlier", "parent_then_child"])
def test_the_command_rebuilds_the_config_its_flags_built(config, typed,
                                                         canonical,
                                                         monkeypatch):
  monkeypatch.chdir(REPO)
  opts = _parsed(["curve", "--config", f"experiments/configs/{config}",
                  "--key", KEY, "--values", "2", *typed, "--out", "o"])
  command = curve.command(opts)
  words = shlex.split(command)
  assert [w for w in words if w.startswith("--config.")] == canonical
  reread = _reread(command)
  assert _config_json(reread) == _config_json(opts)
  assert curve.command(reread) == command
  # The study trains that config: each method's, its key at the value.
  plain = lambda v: v.to_dict() if hasattr(v, "to_dict") else v
  for cfg in curve.from_flags(opts).configs["samples_per_class=2"].values():
    for k in curve.config_overrides(opts["config"]):
      assert (plain(config_path.get_value(k, cfg))
              == plain(config_path.get_value(k, opts.config))), k


def test_the_command_orders_what_the_study_does_not(monkeypatch):
  # Grids by method, weights ascending; paths normalised. The tuning seeds
  # stay in the order given: it orders results.md's list and, from three
  # seeds, the float sums of the weight choice.
  monkeypatch.chdir(REPO)
  config = "experiments/configs/regimes.py:study=width"
  rest = ["--key", "model.kwargs.width", "--values", "1.0,0.25",
             "--seeds", "10"]
  typed = [
      ["curve", "--config", config, *rest, "--grid", "ot=0.1,1",
       "--grid", "fitnets=0.01", "--out", "docs/regimes/x", "--workdir",
       "workdirs/x"],
      ["curve", "--config", "./experiments//configs/regimes.py:study=width",
       *rest, "--grid", "fitnets=0.01", "--grid", "ot=1,0.1", "--out",
       "./docs/regimes/x/", "--workdir", "workdirs/./x/"]]
  commands = {curve.command(_parsed(argv)) for argv in typed}
  assert commands == {
      f"python -m experiments.curve --config {config} --key "
      "model.kwargs.width --values 1.0,0.25 --seeds 10 --grid fitnets=0.01 "
      "--grid ot=0.1,1 --out docs/regimes/x --workdir workdirs/x"}
  seeds = [curve.command(_parsed(typed[0] + ["--tuning_seeds", t]))
           for t in ("100,101", "101,100")]
  assert "--tuning_seeds" not in seeds[0]
  assert "--tuning_seeds 101,100" in seeds[1]
  # The default workdir of a config typed two ways.
  assert len({curve.command(_parsed(argv[:-2])) for argv in typed}) == 1


def test_results_md_shows_the_command_only_where_results_json_has_one():
  # Older results.json have none: their results.md stay as they were.
  summary = _every_weight_summary()
  without = curve.markdown(summary)
  assert "Command" not in without and "```" not in without
  summary["command"] = ("python -m experiments.curve --config c.py:x=1 "
                        "--key k --values 1 --seeds 2 --out 'o d' "
                        "--workdir w")
  block = ("Command (rerun it to regenerate this page; it trains only what "
           "is missing):\n\n```bash\npython -m experiments.curve \\\n"
           "    --config c.py:x=1 \\\n    --key k \\\n    --values 1 \\\n"
           "    --seeds 2 \\\n    --out 'o d' \\\n    --workdir w\n```\n\n")
  with_command = curve.markdown(summary)
  assert with_command.replace(block, "") == without
  # Right under the title.
  assert with_command.startswith("# Test accuracy against `init_permuted`"
                                 "\n\n" + block)


# --- The documented studies --------------------------------------------------


def _documented_commands():
  """The ``experiments.curve`` commands of docs/experiments.md's regime
  studies, as argv lists."""
  text = open(os.path.join(REPO, "docs", "experiments.md")).read()
  text = text.split("## Regime studies", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
  # The usage block has optional flags; other blocks are not commands.
  return [shlex.split(b.replace("\\\n", " ")) for b in blocks
          if "[--" not in b and "experiments.curve" in b]


DOCUMENTED = _documented_commands()


def _id(argv):
  """A documented command's test id: its --out, and every_weight if given."""
  return argv[argv.index("--out") + 1] + (
      "+every_weight" if "--every_weight" in argv else "")


def test_docs_list_the_five_studies_as_their_configs_do():
  commands = _documented_commands()
  assert len(commands) == 6, [_id(c) for c in commands]
  # Permutation's twice: its table, then every weight, resuming from the
  # same records and workdir.
  every = [c for c in commands if "--every_weight" in c]
  assert [[a for a in c if a != "--every_weight"] for c in every] == [
      commands[0]]
  assert len({c[c.index("--out") + 1] for c in commands}) == 5
  for argv in commands:
    config = argv[argv.index("--config") + 1]
    docstring = open(os.path.join(REPO, config.split(":")[0])).read().split(
        '"""')[1]
    assert " ".join(argv) in " ".join(docstring.replace("\\\n", " ").split())


@pytest.mark.parametrize("argv", DOCUMENTED, ids=_id)
def test_documented_commands_are_the_ones_their_pages_will_show(argv,
                                                                monkeypatch):
  # A study's results.md shows its canonical command: the documented one.
  monkeypatch.chdir(REPO)  # The documented paths are the repository's.
  assert curve.command(_parsed(["curve", *argv[3:]])) == " ".join(argv)


RECORDED = sorted(glob.glob(os.path.join(REPO, "docs", "regimes", "*",
                                         "results.json")))


@pytest.mark.parametrize("path", RECORDED,
                         ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_a_recorded_command_is_canonical_and_documented(path, monkeypatch):
  # Older results.json have none; one that has it holds its canonical
  # form, which docs/experiments.md gives.
  command = json.loads(open(path).read()).get("command")
  if command is None:
    pytest.skip("written before results.json recorded its command")
  monkeypatch.chdir(REPO)
  assert curve.command(_reread(command)) == command
  assert command in [" ".join(argv) for argv in DOCUMENTED]


def test_some_committed_study_records_its_command():
  # Else the test above would skip them all.
  assert any("command" in json.loads(open(p).read()) for p in RECORDED)


@pytest.mark.slow  # ~20 s: every record of the five studies, read and checked.
def test_each_documented_study_reruns_from_its_records_alone(tmp_path,
                                                             monkeypatch):
  # A fresh clone: the committed records and teachers, no workdir. Each
  # documented command, in the docs' order, trains nothing, and the last
  # one of each --out writes the committed results.json and results.md
  # again, byte for byte, from the records alone.
  def trains(*args, **kwargs):
    raise AssertionError(f"a documented study would train {args[1]}")

  monkeypatch.setattr(loop, "train_and_evaluate", trains)
  os.symlink(os.path.join(REPO, "experiments"), tmp_path / "experiments")
  shutil.copytree(os.path.join(REPO, "docs", "regimes"),
                  tmp_path / "docs" / "regimes")
  monkeypatch.chdir(tmp_path)  # The documented paths are relative.
  last = {argv[argv.index("--out") + 1]: i
          for i, argv in enumerate(DOCUMENTED)}
  for out in last:
    for name in ("results.json", "results.md"):
      os.remove(os.path.join(out, name))
  for i, argv in enumerate(DOCUMENTED):
    curve.from_flags(_parsed(["curve", *argv[3:]])).run()
    out = argv[argv.index("--out") + 1]
    if last[out] == i:
      for name in ("results.json", "results.md"):
        assert open(os.path.join(out, name)).read() == open(
            os.path.join(REPO, out, name)).read(), (out, name)
  assert not (tmp_path / "workdirs").exists()


@pytest.mark.parametrize("argv", DOCUMENTED, ids=_id)
def test_documented_study_builds_every_config(tmp_path, argv):
  opt = lambda name: argv[argv.index(name) + 1]
  overrides = dict(a[len("--config."):].split("=", 1) for a in argv
                   if a.startswith("--config."))
  module = runs.load_config_module(os.path.join(REPO, opt("--config")))
  study = curve.Curve(module, opt("--key"),
                      curve.parse_values(opt("--values").split(",")), None,
                      int(opt("--seeds")), str(tmp_path / "out"),
                      str(tmp_path / "work"), overrides,
                      focus=opt("--focus") if "--focus" in argv else "ot",
                      every_weight="--every_weight" in argv)
  # The protocol: 10 seeds, weights on two tuning seeds' validation, one
  # weight decay and head decay, the teacher's normalisation, frequent
  # evaluation, a teacher seed no student shares.
  assert study.seeds == 10 and len(study.tuning_seeds) >= 2
  assert not study.teacher_per_value
  methods = set()
  for configs in study.configs.values():
    methods |= set(configs)
    for cfg in configs.values():  # Full batch at every value.
      if cfg.data.samples_per_class:
        assert cfg.batch_size == 5 * cfg.data.samples_per_class
      assert (cfg.loss.weight_decay, cfg.loss.head_decay) == (5e-4, 5e-4)
      assert cfg.teacher_normalization  # And 30 evaluations or more:
      assert cfg.eval_every <= cfg.num_steps // 30
      assert cfg.teacher.job.seed not in (*range(10), *study.tuning_seeds)
      # A teacher trained longer than its student (distill.py's 800-step
      # one, under the 2,000-step student, was no better than it).
      assert cfg.teacher.job.num_steps >= cfg.num_steps
  assert "ot" in methods and any(m.startswith("ot_uniform") for m in methods)


def test_a_preempted_curve_prints_its_own_resume_command(monkeypatch):
  from experiments import cli
  monkeypatch.setattr(sys, "argv", ["/r/experiments/curve.py", "--key", "k"])
  assert cli.resume_command() == "python -m experiments.curve --key k"
  monkeypatch.setattr(sys, "argv", ["/r/experiments/main.py", "--workdir=w"])
  assert cli.resume_command() == "python -m experiments.main --workdir=w"


# --- Weights one method takes from another's choice ---------------------------


DISTILL = "experiments/configs/regimes.py:study=distill"


def _distill_curve(tmp_path, methods=None, focus="ot_kd"):
  module = runs.load_config_module(os.path.join(REPO, DISTILL))
  return curve.Curve(module, "num_steps", [2000], methods, 10,
                     str(tmp_path / "out"), str(tmp_path / "work"), {},
                     focus=focus)


def test_a_combination_takes_the_weight_chosen_for_its_part(tmp_path,
                                                           monkeypatch):
  study = _distill_curve(tmp_path)
  asked = []

  def tune(value, method):
    asked.append((value, method))
    return {"weight": {"kd": 0.3}.get(method, 0.02)}

  monkeypatch.setattr(study, "tune", tune)
  cfg = study.at("ot_kd", 2000, 0.05)
  assert (cfg.loss.terms.kd.weight, cfg.loss.terms.ot.weight) == (0.3, 0.05)
  assert asked == [(2000, "kd")]
  assert study.at("ot_uniform_kd", 2000, 1.0).loss.terms.kd.weight == 0.3
  assert study.at("kd", 2000, 7.0).loss.terms.kd.weight == 7.0
  # The configs built before any run do not tune: the file's own weight.
  assert study.configs["num_steps=2000"]["ot_kd"].loss.terms.kd.weight != 0.3


def test_a_combination_without_its_part_is_refused(tmp_path):
  with pytest.raises(ValueError, match="kd must be one of the methods"):
    _distill_curve(tmp_path, methods=["student", "ot_kd"])


def test_results_md_shows_an_inherited_weight():
  key = "num_steps"
  runs_ = [{"label": curve.label(key, 2000), "method": m, "seed": 0,
            "status": "finished", "test_accuracy_best_val": 0.8,
            "test_accuracy_last": 0.8, "best_step": 90, "step": 100}
           for m in ("kd", "ot_kd")]
  chosen = {"key": "loss.terms.ot.weight", "weight": 0.05,
            "grid": {"0.05": 0.8}, "test": {"0.05": 0.8}, "bracketed": True,
            "note": "", "inherited": {"loss.terms.kd.weight": 0.3}}
  summary = {"key": key, "values": [2000], "methods": ["kd", "ot_kd"],
             "seeds": 1, "tuning_seeds": [100, 101], "focus": "ot_kd",
             "chosen": {curve.label(key, 2000): {"ot_kd": chosen}},
             "runs": runs_}
  assert "| ot_kd | 0.05, kd.weight 0.3 | 1 |" in curve.markdown(summary)


def _two_focus_summary(focus):
  """A distill-like summary along the key (two values, two seeds): four
  methods, each seed's accuracy a fixed offset per method and value."""
  key, values = "num_steps", [1000, 2000]
  methods = ["student", "kd", "ot", "ot_kd"]
  offset = {"student": 0.0, "kd": 0.01, "ot": 0.02, "ot_kd": 0.04}
  runs_ = [{"label": curve.label(key, v), "method": m, "seed": s,
            "status": "finished",
            "test_accuracy_best_val": 0.8 + offset[m] * (1 + (v == 2000))
            + s / 100,
            "test_accuracy_last": 0.79 + offset[m] * (1 + 2 * (v == 2000))
            + s / 100,
            "best_step": 90, "step": 100, "eval_every": 5}
           for v in values for m in methods for s in (0, 1)]
  return {"key": key, "values": values, "methods": methods, "seeds": 2,
          "tuning_seeds": [100, 101], "focus": focus, "chosen": {},
          "runs": runs_}


def test_results_md_pairs_each_focus_method_once_per_pair():
  md = curve.markdown(_two_focus_summary(["ot_kd", "ot"]))
  value = md.split("## num_steps = 1000")[1].split("## num_steps = 2000")[0]
  first = lambda line: line.split("|")[1].strip()
  pairs = [first(l) for l in value.splitlines()
           if l.startswith("| ") and " − " in first(l)]
  # ot_kd against every method, then ot against those not yet paired with
  # it: ot_kd − ot once, never ot − ot_kd.
  assert pairs == ["ot_kd − student", "ot_kd − kd", "ot_kd − ot",
                   "ot − student", "ot − kd"]
  captions = [l for l in value.splitlines()
              if l.startswith("Paired differences")]
  assert [c.split("seeds on which ")[1] for c in captions] == [
      "ot_kd was better.", "ot was better."]
  # ot_kd − ot: 2 points at 1000 (best val), both seeds.
  assert "| ot_kd − ot | 2 | +2.00 | 0.00 | 2/2 | +2.00 | 0.00 | 2/2 |" in value
  # An interaction section per focus method, each pair once: the gap grows
  # by its size at 1000 (the offsets double at 2000 at best val, triple at
  # last).
  sections = md.split("## Interaction: ")[1:]
  assert [s.split("\n")[0] for s in sections] == [
      "ot_kd's gap along `num_steps`", "ot's gap along `num_steps`"]
  rows = [[first(l) for l in s.splitlines() if l.startswith("| ot")]
          for s in sections]
  assert rows == [["ot_kd − student", "ot_kd − kd", "ot_kd − ot"],
                  ["ot − student", "ot − kd"]]
  assert ("| ot_kd − ot | 2000 − 1000 | 2 | +2.00 | 0.00 | 2/2 | +4.00 | "
          "0.00 | 2/2 |") in sections[0]


def test_results_json_focus_is_a_string_for_one_method(tmp_path):
  # Committed results.json hold a string: one method reads and writes as
  # before; a list is read as the same page.
  one = _two_focus_summary("ot")
  assert curve.markdown(one) == curve.markdown({**one, "focus": ["ot"]})
  assert "## Interaction: ot's" in curve.markdown(one)
  assert "Interaction: ot_kd" not in curve.markdown(one)
  for focus, written in (("ot_kd", "ot_kd"), ("ot_kd,ot", ["ot_kd", "ot"])):
    study = _distill_curve(tmp_path, focus=focus)
    assert study.write({}, [])["focus"] == written
    assert runs.read_json(str(tmp_path / "out" / "results.json"))[
        "focus"] == written


def test_results_md_counts_runs_that_peak_at_the_first_or_last_eval():
  # The protocol's checks: a best step at the first evaluation means too
  # coarse an evaluation (or too strong a term), at the last step an
  # undertrained run.
  key = "num_steps"
  runs_ = [{"label": curve.label(key, 100), "method": "none", "seed": s,
            "status": "finished", "test_accuracy_best_val": 0.8,
            "test_accuracy_last": 0.8, "best_step": best, "step": 100,
            "eval_every": 5} for s, best in enumerate((5, 40, 100, 100))]
  summary = {"key": key, "values": [100], "methods": ["none"], "seeds": 4,
             "tuning_seeds": [100, 101], "focus": "none", "chosen": {},
             "runs": runs_}
  assert "| 70 (1 / 2) |" in curve.markdown(summary)
  # Written before results.json kept eval_every: the first count unknown.
  for r in runs_:
    del r["eval_every"]
  assert "| 70 (? / 2) |" in curve.markdown(summary)
  assert curve.best_steps([]) == ""


# --- --every_weight: the table seeds at every weight of the grid -------------


def _every_weight_summary():
  """A permutation-like summary: none (no grid) and ot, chosen 0.1 of 0.01,
  0.1 and 1, two table seeds; the block's none is not the table's (another
  training of the teacher, say); at 1 one run diverged."""
  key, value = "init_permuted", True
  vl = curve.label(key, value)

  def run(method, seed, best, last, **extra):
    return {"label": vl, "method": method, "seed": seed, "kind": "run",
            "status": "finished" if best else "diverged",
            "test_accuracy_best_val": best, "test_accuracy_last": last,
            "best_step": 90, "step": 100, "eval_every": 5, **extra}

  table = [run("none", 0, 0.80, 0.79), run("none", 1, 0.82, 0.81),
           run("ot", 0, 0.83, 0.82), run("ot", 1, 0.84, 0.80)]
  every = [run(m, s, best, last, kind="every_weight", weight=w)
           for m, w, s, best, last in (("none", None, 0, 0.79, 0.78),
                                       ("none", None, 1, 0.83, 0.82),
                                       ("ot", 0.01, 0, 0.82, 0.80),
                                       ("ot", 0.01, 1, 0.81, 0.80),
                                       ("ot", 0.1, 0, 0.84, 0.82),
                                       ("ot", 0.1, 1, 0.83, 0.81),
                                       ("ot", 1.0, 0, 0.78, 0.77),
                                       ("ot", 1.0, 1, None, None))]
  chosen = {"key": "loss.terms.ot.weight", "weight": 0.1,
            "grid": {"0.01": 0.8, "0.1": 0.85, "1": 0.7},
            "test": {"0.01": 0.8, "0.1": 0.85, "1": 0.7}, "bracketed": True,
            "note": ""}
  return {"key": key, "values": [value], "methods": ["none", "ot"],
          "seeds": 2, "tuning_seeds": [100, 101], "focus": "ot",
          "wall_s": {"tuning": 60.0, "runs": 60.0, "every_weight": 120.0},
          "chosen": {vl: {"ot": chosen}}, "runs": table,
          "every_weight_runs": every}


def test_results_md_gives_every_weight_against_the_baseline():
  md = curve.markdown(_every_weight_summary())
  assert "### Every weight of the grid (table seeds)" in md
  assert "table 1 min, every weight 2 min." in md
  # ot - the block's none per seed (never the table's): at 0.01 +3, -2
  # (best val) and +2, -2 (last); at the chosen 0.1 +5, 0 and +4, -1; at 1
  # only seed 0 finished.
  section = md.split("### Every weight")[1]
  rows = [line for line in section.splitlines()
          if line.startswith(("| none |", "| ot |"))]
  assert rows == [
      "| none | — | 2 | 81.00 ± 2.00 | 80.00 ± 2.00 | | | | | | |",
      "| ot | 0.01 | 2 | 81.50 ± 0.50 | 80.00 ± 0.00 | +0.50 | 2.50 | 1/2 | "
      "+0.00 | 2.00 | 1/2 |",
      "| ot | 0.1 * | 2 | 83.50 ± 0.50 | 81.50 ± 0.50 | +2.50 | 2.50 | 1/2 | "
      "+1.50 | 2.50 | 1/2 |",
      "| ot | 1 | 1 (+1 diverged) | 78.00 ± 0.00 | 77.00 ± 0.00 | -1.00 | "
      "0.00 | 0/1 | -1.00 | 0.00 | 0/1 |"]


def test_results_md_gives_every_weight_along_the_key():
  # A second value whose block shifts each run by a known amount per weight:
  # none +1 point, ot at 0.01 -2, at 0.1 +0 (seed 1 only: seed 0 absent),
  # and ot at 1 is on its grid alone (no row).
  summary = _every_weight_summary()
  other = curve.label("init_permuted", False)
  shift = {None: 0.01, 0.01: -0.02, 0.1: 0.0}
  moved = [{**r, "label": other,
            "test_accuracy_best_val": r["test_accuracy_best_val"]
            - shift[r["weight"]],
            "test_accuracy_last": r["test_accuracy_last"] - shift[r["weight"]]}
           for r in summary["every_weight_runs"] if r["weight"] in shift
           and not (r["weight"] == 0.1 and r["seed"] == 0)]
  summary["values"] = [False, True]
  summary["every_weight_runs"] += moved
  section = "\n".join(curve.every_weight_along(summary))
  assert section.startswith(
      "## Along `init_permuted`, per method at each weight (every weight)")
  rows = [line for line in section.splitlines()
          if line.startswith(("| none |", "| ot "))]
  assert rows == [
      "| none | True − False | 2 | +1.00 | 0.00 | 2/2 | +1.00 | 0.00 | 2/2 |",
      "| ot at 0.01 | True − False | 2 | -2.00 | 0.00 | 0/2 | -2.00 | 0.00 | "
      "0/2 |",
      "| ot at 0.1 | True − False | 1 | +0.00 | 0.00 | 0/1 | +0.00 | 0.00 | "
      "0/1 |"]
  assert section in curve.markdown(summary)
  del summary["every_weight_runs"]
  assert curve.every_weight_along(summary) == []


def test_results_md_without_every_weight_runs_is_unchanged():
  summary = _every_weight_summary()
  section = "\n".join(curve.every_weight_table(summary, True))
  with_flag = curve.markdown(summary)
  del summary["every_weight_runs"], summary["wall_s"]["every_weight"]
  without = curve.markdown(summary)
  assert curve.every_weight_table(summary, True) == []
  assert "very weight" not in without
  # The flag adds its section and its wall time, nothing else.
  assert with_flag.replace(", every weight 2 min", "").replace(
      "\n" + section, "") == without


def test_every_weight_runs_left_count_the_block(tmp_path):
  study = _curve(tmp_path, values=(3,), seeds=2, every_weight=True,
                 methods=("finetune", "ot"), grids={"ot": (0.01, 0.1, 1.0)})
  vl = curve.label(KEY, 3)
  # Before tuning: every weight of the grid on both seeds (the table's runs
  # are not the block's), and the baseline (the first method, no grid).
  assert study._every_weight_left(vl, "ot") == 3 * 2
  assert study._every_weight_left(vl, "finetune") == 2
  for method, weight in (("ot", 0.01), ("finetune", None)):
    path = study._weight_path(vl, method, weight, 0)
    os.makedirs(os.path.dirname(path))
    runs.write_json(path, {})
  assert study._weight_path(vl, "finetune", None, 0).endswith(
      os.path.join("every_weight", vl, "finetune", "seed0.json"))
  assert study._every_weight_left(vl, "ot") == 5
  assert study._every_weight_left(vl, "finetune") == 1
  assert _curve(tmp_path, values=(3,), seeds=2, methods=("finetune", "ot"),
                grids={"ot": (0.01, 0.1, 1.0)})._every_weight_left(
                    vl, "ot") == 0  # Without the flag.
  # A tuning extension past the grid's edge (kept in --out) counts too: a
  # study resumed before tuning reads it must still see those runs left.
  extension = study._tuning_path(vl, "ot", 10.0, 100)
  os.makedirs(os.path.dirname(extension))
  runs.write_json(extension, {})
  assert study._every_weight_left(vl, "ot") == 5 + 2


def test_every_weight_skips_a_method_whose_tuning_all_diverged(tmp_path,
                                                               monkeypatch):
  study = _curve(tmp_path, values=(3,), seeds=2, every_weight=True,
                 grids={"ot": (0.01, 0.1)})
  monkeypatch.setattr(study, "tune", lambda value, method: {
      "weight": None, "grid": {0.01: None, 0.1: None}})
  assert study.every_weight_runs(3, "ot") == []


@pytest.mark.parametrize("spec,match", [
    ("ot=0.1234567", "more than 6 significant digits; write 0.123457"),
    ("ot=0.1,x", "with numbers"),
    ("=0.1", "write METHOD=V1,V2"),
    # Counted twice, it would let the grid extend once more (runs.bracket).
    ("ot=0.1,1,0.10", "repeats a weight"),
])
def test_parse_grids_refuses_what_a_record_path_cannot_keep(spec, match):
  with pytest.raises(ValueError, match=match):
    curve.parse_grids([spec])
  assert curve.parse_grids(["ot=0.001,10"]) == {"ot": (0.001, 10.0)}


@pytest.mark.slow
def test_every_weight_records_the_other_weights_and_a_rerun_trains_nothing(
    tmp_path, teacher_dir, monkeypatch):
  trained = []
  train = loop.train_and_evaluate

  def counted(config, workdir, *args, **kwargs):
    trained.append(os.path.relpath(workdir, tmp_path / "work"))
    return train(config, workdir, *args, **kwargs)

  monkeypatch.setattr(loop, "train_and_evaluate", counted)
  study = lambda every_weight: _curve(
      tmp_path, module=DIGITS_SMOKE, values=(3,),
      overrides={"teacher.workdir": str(teacher_dir)}, extensions=0,
      grids={"ot": (0.1, 1.0)}, every_weight=every_weight)
  summary = study(True).run()
  chosen = summary["chosen"]["samples_per_class=3"]["ot"]["weight"]
  # 2 weights x 2 tuning seeds, the table's 2 methods, then the block: the
  # baseline (l2_sp, no grid here) and ot at both weights, the chosen one
  # too (the block reuses none of the table's runs).
  assert len(trained) == 4 + 2 + 3
  vl = "samples_per_class=3"
  assert sorted(t for t in trained if "every_weight" in t) == [
      f"{vl}/every_weight/l2_sp/seed0", f"{vl}/every_weight/ot/weight=0.1/seed0",
      f"{vl}/every_weight/ot/weight=1/seed0"]
  block = tmp_path / "out" / "every_weight" / vl
  for w in (0.1, 1.0):
    record = json.loads((block / "ot" / f"weight={w:g}" / "seed0.json"
                         ).read_text())
    assert (record["kind"], record["weight"], record["seed"]) == (
        "every_weight", w, 0)
    assert record["config"]["loss"]["terms"]["ot"]["weight"] == w
  baseline = json.loads((block / "l2_sp" / "seed0.json").read_text())
  assert (baseline["method"], baseline["weight"]) == ("l2_sp", None)
  assert [(r["method"], r["weight"]) for r in summary["every_weight_runs"]
          ] == [("l2_sp", None), ("ot", 0.1), ("ot", 1.0)]
  assert summary["wall_s"]["every_weight"] == pytest.approx(sum(
      r["wall_s"] for r in summary["every_weight_runs"]), abs=0.1)
  md = (tmp_path / "out" / "results.md").read_text()
  other = 1.0 if chosen == 0.1 else 0.1
  assert f"| ot | {chosen:g} * | 1 |" in md and f"| ot | {other:g} | 1 |" in md
  assert "| l2_sp | — | 1 |" in md.split("### Every weight")[1]

  # Without the flag: nothing trains, the records stay, no section.
  trained.clear()
  without = study(False).run()
  assert "every_weight_runs" not in without and not trained
  assert "Every weight" not in (tmp_path / "out" / "results.md").read_text()
  assert (block / "ot" / f"weight={other:g}" / "seed0.json").exists()
  # With it again: every record reused.
  assert study(True).run()["every_weight_runs"] == summary[
      "every_weight_runs"] and not trained
