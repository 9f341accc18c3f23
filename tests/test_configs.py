"""Config arguments (``file.py:data=...,method=...,smoke=True``), the grids
named once, the committed reproduce and sweep records against the configs
that made them, and how the tools read a config file (experiments.runs).
Fast: configs only, no run."""

import ast
import glob
import importlib
import json
import math
import os
import shutil

import pytest

from experiments import cli, loop, reproduce, runs, sweep
from experiments.configs import (common, cross_arch, distill, first_regimes,
                                 transfer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"transfer": transfer, "distill": distill, "cross_arch": cross_arch}
DATASETS = ("digits", "fashion_mnist")


def test_parse_arg_reads_pairs_and_a_bare_method():
  defaults = {"data": "digits", "method": ""}
  assert common.parse_arg(None, **defaults) == defaults
  assert common.parse_arg("", **defaults) == defaults
  assert common.parse_arg("ot", **defaults) == {"data": "digits",
                                                "method": "ot"}
  assert common.parse_arg("method=kd,data=fashion_mnist", **defaults) == {
      "data": "fashion_mnist", "method": "kd"}
  with pytest.raises(ValueError, match=r"Unknown config argument 'dataset'"
                     r".*takes data, method"):
    common.parse_arg("dataset=digits", **defaults)


@pytest.mark.parametrize("arg,method,expected", [
    (None, "ot", "ot"), ("", "kd", "kd"), ("ot", "kd", "kd"),
    ("data=fashion_mnist", "kd", "data=fashion_mnist,method=kd"),
    ("data=fashion_mnist,method=ot", "kd", "data=fashion_mnist,method=kd"),
    ("method=ot,data=digits", None, "method=ot,data=digits"),
    (None, None, None),
])
def test_with_method_keeps_the_other_settings(arg, method, expected):
  assert common.with_method(arg, method) == expected


@pytest.mark.parametrize("setting", SETTINGS)
def test_unknown_dataset_or_method_names_the_choices(setting):
  module = SETTINGS[setting]
  with pytest.raises(ValueError, match=r"data='cifar'.*'digits', "
                     r"'fashion_mnist'"):
    module.get_config("data=cifar")
  with pytest.raises(ValueError, match=r"Unknown method 'magic'.*choose one"):
    module.get_config("data=fashion_mnist,method=magic")


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("data", DATASETS)
def test_smoke_changes_only_sizes(setting, data):
  module = SETTINGS[setting]
  for method in module.get_methods(f"data={data}"):
    real = runs.flatten(module.get_config(
        f"data={data},method={method}").to_dict())
    smoke = runs.flatten(module.get_config(
        f"data={data},method={method},smoke=True").to_dict())
    assert real.keys() == smoke.keys()
    changed = {k for k in real if real[k] != smoke[k]}
    sizes, teacher_sizes = common.SMOKE[data]
    assert changed <= set(sizes) | {f"teacher.job.{k}" for k in teacher_sizes}
    assert smoke["num_steps"] == sizes["num_steps"]
    assert smoke["teacher.job.num_steps"] == teacher_sizes["num_steps"]
  with pytest.raises(ValueError, match=r"smoke='yes' is not a boolean"):
    module.get_config(f"data={data},smoke=yes")


def test_smoke_shrinks_k_only_where_the_setting_draws_k():
  t = transfer.get_config("data=fashion_mnist,smoke=True")
  d = distill.get_config("data=fashion_mnist,smoke=True")
  assert t.data.samples_per_class == 3
  assert d.data.samples_per_class is None  # Every image, as in the setting.
  assert t.teacher.job.data.samples_per_class is None


def _config_files():
  return sorted(glob.glob(os.path.join(REPO, "experiments", "configs",
                                       "*.py")))


def test_the_weight_grids_are_named_once():
  # No config file writes a grid literal: every SWEEP entry is common.GRIDS'.
  for path in _config_files():
    if os.path.basename(path) in ("common.py", "regimes.py"):
      continue
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Assign) and any(
          getattr(t, "id", "") == "SWEEP" for t in node.targets):
        literals = [n for n in ast.walk(node.value)
                    if isinstance(n, ast.Tuple) and n.elts and all(
                        isinstance(e, ast.Constant) for e in n.elts)]
        assert not literals, f"{path}: a grid literal in SWEEP"
  for spec in ("transfer.py:data=fashion_mnist",
               "distill.py:data=fashion_mnist",
               "cross_arch.py:data=fashion_mnist", "vit_distill.py:teacher=vit",
               "first_regimes.py:study=student_size"):
    sweep = runs.load_config_module(
        os.path.join(REPO, "experiments/configs", spec)).SWEEP
    assert sweep and all(common.GRIDS[m] == g for m, g in sweep.items()), spec


def test_omega_i_applies_where_the_trained_teachers_width_is_the_students():
  # The teacher's width is in teacher.job.model.kwargs (a trained teacher);
  # teacher.kwargs is read only for torchvision and random teachers.
  c = first_regimes.get_config("study=student_size,method=feature_matching")
  assert first_regimes.applies("feature_matching", c)  # 1.0 and 1.0.
  for student, teacher, equal in ((2.0, 2.0, True), (1.0, 2.0, False),
                                  (0.5, 1.0, False)):
    with c.unlocked():
      c.model.kwargs.width = student
      c.teacher.job.model.kwargs = {"width": teacher}
    assert first_regimes.applies("feature_matching", c) is equal
    assert first_regimes.applies("ot", c)  # Any widths.


# The committed records of experiments.reproduce and experiments.sweep, and
# the configs whose documented commands made them.
RECORDS = {
    "docs/digits_transfer": "transfer.py:data=digits",
    "docs/fashion_mnist/fashion_mnist_transfer": "transfer.py:data=fashion_mnist",
    "docs/fashion_mnist/fashion_mnist_distill": "distill.py:data=fashion_mnist",
    "docs/fashion_mnist/fashion_mnist_cross_arch":
        "cross_arch.py:data=fashion_mnist",
    "docs/fashion_mnist/fashion_mnist_vit_distill": "vit_distill.py:teacher=vit",
}


# The first protocol's records (teacher seed 0, the student's
# normalisation, per-method decays, one tuning seed) stay beside them in
# first_protocol/, as they were: no config makes them any more.
@pytest.mark.parametrize("folder", RECORDS)
def test_the_committed_records_are_their_configs_runs(folder):
  """Each reproduce record's weights are its method's in the config, and
  each sweep record tried a value of the config's grid, the chosen one the
  config's (records of keys a sweep no longer varies are kept as they
  are); the docs' commands name the config."""
  spec = RECORDS[folder]
  module = runs.load_config_module(os.path.join(REPO, "experiments/configs",
                                                spec))
  checked = 0
  for path in glob.glob(os.path.join(REPO, folder, "results*.json")):
    for record in json.load(open(path)):
      assert record["hyperparameters"] == runs.hyperparameters(
          module.get_config(record["method"])), (path, record["method"])
      checked += 1
  sweep_path = os.path.join(REPO, folder, "sweep.json")
  if os.path.exists(sweep_path):
    sweep = json.load(open(sweep_path))
    for record in sweep["records"]:
      key, grid = module.SWEEP[record["method"]]
      if record["key"] == key:
        assert on_the_grid_or_past_an_edge(record["value"], grid), record
        checked += 1
    for method, grids in sweep.get("grids", {}).items():  # Newer sweeps.
      key, grid = module.SWEEP[method]
      assert grids == {key: list(grid)}, method
    for method, chosen in sweep["chosen"].items():
      key = module.SWEEP[method][0]
      if key in chosen:
        assert runs.flatten(module.get_config(method).to_dict())[key] == (
            chosen[key]), method
  assert checked


# The settings' committed tables, made by their documented commands (the
# config files' docstrings, docs/results.md), both with --out the folder:
#   python -m experiments.sweep --config <spec> --tuning_seeds 100,101
#   python -m experiments.reproduce --config <spec> --seeds 10
TABLES = [f for f in RECORDS if "vit_distill" not in f]


@pytest.mark.parametrize("folder", TABLES)
def test_a_rerun_of_the_committed_commands_trains_nothing(folder, tmp_path,
                                                          monkeypatch):
  """On a fresh clone (no workdir) both commands reuse every record of the
  committed folder (each the run the command builds now: runs.load_record)
  and, from the records alone, write the committed sweep and tables again
  byte for byte."""

  def trains(*args, **kwargs):
    raise AssertionError(f"a rerun of {folder}'s commands would train")

  monkeypatch.setattr(loop, "train_and_evaluate", trains)
  committed = os.path.join(REPO, folder)
  out = str(tmp_path / "out")
  outputs = ("sweep.json", "sweep.md", "results.json", "results.md")
  shutil.copytree(committed, out)
  for name in outputs:  # Made anew from the records.
    os.remove(os.path.join(out, name))
  module = runs.load_config_module(os.path.join(REPO, "experiments/configs",
                                                RECORDS[folder]))
  grids = sweep.sweep_grids(module)
  records, _ = sweep.run_sweep(module, str(tmp_path / "sweep"), [100, 101],
                               list(grids), {}, grids, 2, out)
  sweep.save(out, records, {m: {key: list(values)}
                            for m, (key, values) in grids.items()})
  configs = runs.method_configs(module, module.methods, {})
  reproduce.run_all(configs, str(tmp_path / "reproduce"), 10,
                    baseline=module.baseline, out=out)
  for name in outputs:
    assert open(os.path.join(out, name)).read() == open(
        os.path.join(committed, name)).read(), name
  assert not (tmp_path / "sweep").exists()
  assert not (tmp_path / "reproduce").exists()


def on_the_grid_or_past_an_edge(value: float, grid) -> bool:
  """A sweep tries its grid, then 10x, 100x, ... past the edge its best is
  at (experiments.sweep --extensions)."""
  if value in grid:
    return True
  for edge, sign in ((min(grid), -1), (max(grid), 1)):
    decades = sign * math.log10(value / edge)
    if decades > 0.5 and math.isclose(decades, round(decades), abs_tol=1e-9):
      return True
  return False


def test_a_sweep_record_may_lie_decades_past_its_grids_edges():
  grid = (0.01, 0.1, 1.0)
  assert all(on_the_grid_or_past_an_edge(v, grid)
             for v in (0.1, 0.01 * 0.1, 1e-4, 10.0, 100.0))
  assert not any(on_the_grid_or_past_an_edge(v, grid)
                 for v in (0.05, 0.3, 3.0, 5e-4))


# The config files the flattening retired (one file per setting now).
RETIRED = [f"{d}_{s}" for d in ("digits", "fashion_mnist")
           for s in ("transfer", "distill", "cross_arch")] + [
    "fashion_mnist_vit_distill", "fashion_mnist_vit_cross_arch",
    "fashion_mnist_init", "fashion_mnist_scarcity", "fashion_mnist_width",
    "cub200_resnet50", "stanford_dogs_resnet101",
    "cifar100_resnet32x4_resnet8x4", "cifar100_resnet56_resnet20",
    "cifar100_wrn40_2_wrn16_2"]


def test_no_command_line_names_a_retired_config_file():
  paths = [os.path.join(REPO, "README.md"), *glob.glob(
      os.path.join(REPO, "docs", "**", "*.md"), recursive=True),
      *glob.glob(os.path.join(REPO, "experiments", "**", "*.py"),
                 recursive=True),
      *glob.glob(os.path.join(REPO, "tests", "*.py"))]
  for path in paths:
    text = open(path).read()
    for name in RETIRED:
      assert f"configs/{name}.py" not in text, (path, name)
  for name in RETIRED:
    assert not os.path.exists(os.path.join(REPO, "experiments", "configs",
                                           f"{name}.py")), name


@pytest.mark.parametrize("setting", SETTINGS)
def test_reproduce_reads_a_config_with_arguments(setting):
  path = os.path.join(REPO, f"experiments/configs/{setting}.py:"
                      "data=fashion_mnist,method=ot")
  assert cli.config_name(path) == f"fashion_mnist_{setting}"
  assert cli.config_name(path.split(":")[0]) == setting
  module = runs.load_config_module(path)
  default = module.get_config()
  assert default.method == "ot" and default.data.name == "fashion_mnist"
  for method in module.methods:  # data=... kept for every method.
    c = module.get_config(method)
    assert (c.method, c.data.name) == (method, "fashion_mnist")
  assert module.SWEEP and set(module.SWEEP) <= set(module.methods)
  # On digits only transfer's table is committed, so only it has a sweep;
  # distill's and cross_arch's digits weights are an exploratory sweep's.
  digits = runs.load_config_module(path.replace("fashion_mnist", "digits"))
  assert (digits.SWEEP != {}) == (setting == "transfer"), setting
  assert set(digits.SWEEP) <= set(digits.methods)


# Every config file's settings and the baseline of each (reproduce pairs
# every method with it; the committed results.md tables name it).
SUITES = {
    **{f"{s}.py:data={d}": "student" if s == "distill" else "scratch"
       for s in SETTINGS for d in DATASETS},
    "vit_distill.py:teacher=vit": "student",
    "vit_distill.py:teacher=small_cnn": "student",
    **{f"cifar100.py:pair={p}": "student" for p in (
        "resnet56_resnet20", "resnet32x4_resnet8x4", "wrn40_2_wrn16_2")},
    "imagenet_transfer.py:data=cub200": "finetune_l2",
    "imagenet_transfer.py:data=stanford_dogs": "finetune_l2",
    "regimes.py:study=permutation": "none",
    "regimes.py:study=cross_arch": "scratch",
    "regimes.py:study=width": "scratch",
    "regimes.py:study=scarcity": "finetune",
    "regimes.py:study=distill": "student",
    "first_regimes.py:study=initialisation": "none",
    "first_regimes.py:study=data_scarcity": "scratch",
    "first_regimes.py:study=student_size": "scratch",
}


def test_every_config_file_has_a_suite():
  files = {os.path.basename(p) for p in glob.glob(
      os.path.join(REPO, "experiments", "configs", "*.py"))}
  assert {s.split(":")[0] for s in SUITES} == files - {
      "__init__.py", "common.py", "paper.py"}


@pytest.mark.parametrize("spec", SUITES)
def test_the_suite_is_the_config_files_not_a_key_of_the_run_config(spec):
  # The tools read the file's methods, in order, and its baseline (the
  # first) from runs.load_config_module; every run config of the file lacks
  # the retired keys (experiments.same_run.RETIRED), its teacher's too.
  file, arg = spec.split(":")
  source = importlib.import_module(f"experiments.configs.{file[:-3]}")
  module = runs.load_config_module(
      os.path.join(REPO, "experiments", "configs", spec))
  assert module.methods == tuple(source.get_methods(arg))
  assert module.baseline == module.methods[0] == SUITES[spec]
  assert module.get_config().method in module.methods
  for method in module.methods:
    config = runs.flatten(module.get_config(method).to_dict())
    assert config["method"] == method
    assert not [k for k in config
                if k.rsplit(".", 1)[-1] in ("method_order", "baseline_method")]


# The settings' config files (not the regime studies, which choose their
# controls per study and tune each control's weight).
SETTING_SPECS = [s for s in SUITES if "regimes.py" not in s]


@pytest.mark.parametrize("spec", SETTING_SPECS)
def test_every_setting_has_omega_ps_controls_right_after_ot(spec):
  # ot_uniform and ot_standardize: the ot method (initialisation, weight,
  # layers) with their option alone (common.OT_CONTROLS); that the uniform
  # option gives a uniform plan is tests/test_regimes.py's.
  module = runs.load_config_module(
      os.path.join(REPO, "experiments", "configs", spec))
  methods = list(module.methods)
  at = methods.index("ot")
  assert methods[at:at + 3] == ["ot", "ot_uniform", "ot_standardize"]
  ot = runs.flatten(module.get_config("ot").to_dict())
  for control, options in common.OT_CONTROLS.items():
    config = runs.flatten(module.get_config(control).to_dict())
    assert config.keys() == ot.keys()
    changed = {k: config[k] for k in config if config[k] != ot[k]}
    assert changed == {"method": control, **{
        f"loss.terms.ot.options.{k}": v for k, v in options.items()}}
  assert common.OT_CONTROLS == {
      "ot_uniform": {"relative_epsilon": 1e4},
      "ot_standardize": {"normalize": "standardize"}}


@pytest.mark.parametrize("folder", [f for f in RECORDS if os.path.exists(
    os.path.join(REPO, f, "results.md"))])
def test_the_committed_tables_pair_with_the_config_files_baseline(folder):
  module = runs.load_config_module(os.path.join(REPO, "experiments/configs",
                                                RECORDS[folder]))
  table = open(os.path.join(REPO, folder, "results.md")).read()
  assert f"| method − {module.baseline} (same seeds) |" in table


def test_digits_configs_run_on_one_device_and_fashion_mnist_on_all():
  for setting, module in SETTINGS.items():
    for data in DATASETS:
      c = module.get_config(f"data={data}")
      expected = common.MAX_DEVICES[data]
      assert c.max_devices == c.teacher.job.max_devices == expected, setting


# --- The protocol of docs/experiments.md, in the settings' configs -----------

# Every settings config reproduce and sweep run (vit_distill builds on
# distill.py), and the seeds the protocol's commands give their runs.
PROTOCOL_SPECS = [f"{s}.py:data={d}" for s in SETTINGS for d in DATASETS] + [
    "vit_distill.py:teacher=vit", "vit_distill.py:teacher=small_cnn"]
TABLE_SEEDS, TUNING_SEEDS = tuple(range(10)), (100, 101)


@pytest.mark.parametrize("spec", PROTOCOL_SPECS)
def test_no_student_starts_from_its_teachers_initial_weights(spec):
  module = runs.load_config_module(
      os.path.join(REPO, "experiments", "configs", spec))
  random_starts = 0
  for method in module.methods:
    config = module.get_config(method)
    assert config.teacher.job.seed == common.TEACHER_SEED, method
    for seed in TABLE_SEEDS + TUNING_SEEDS:
      c = runs.seeded(config, seed, "/root")
      if runs.same_network(c) and not c.init_from_teacher:
        assert c.seed != c.teacher.job.seed, (method, seed)
        random_starts += 1
    # What reproduce and curve check before any run.
    runs.check_initialisation(config, TABLE_SEEDS + TUNING_SEEDS, method)
  # transfer's scratch is such a student: the check above is not vacuous.
  assert random_starts or not spec.startswith("transfer.py")


@pytest.mark.parametrize("spec", PROTOCOL_SPECS)
def test_every_method_of_a_table_has_one_decay_and_the_teachers_inputs(spec):
  # Methods differ by their term and initialisation only: one weight decay
  # and one head decay (no method tunes a decay: the former finetune_l2 is
  # plain fine-tuning, as in regimes.py), and every student, those from the
  # teacher's weights included, reads inputs normalised with the teacher's
  # statistics.
  module = runs.load_config_module(
      os.path.join(REPO, "experiments", "configs", spec))
  decays, inits = set(), set()
  for method in module.methods:
    c = module.get_config(method)
    decays.add((c.loss.weight_decay, c.loss.head_decay))
    inits.add(c.init_from_teacher)
    assert c.teacher_normalization and not c.imagenet_normalization, method
  assert decays == {(common.DECAY, common.DECAY)}, decays
  assert not [key for key, _ in (module.SWEEP or {}).values()
              if key.endswith("decay")]
  if spec.startswith("transfer.py"):
    assert inits == {False, True}  # Both starts share the decays.


def test_first_regimes_keep_the_first_protocols_settings():
  # Its committed records (tests/test_same_run.py) were made with these.
  for study in first_regimes.STUDIES:
    for method in first_regimes.get_methods(f"study={study}"):
      c = first_regimes.get_config(f"study={study},method={method}")
      assert c.teacher.job.seed == 0 and not c.teacher_normalization
  decays = {m: (c.loss.weight_decay, c.loss.head_decay) for m, c in (
      (m, first_regimes.get_config(f"study=data_scarcity,method={m}"))
      for m in first_regimes.get_methods("study=data_scarcity"))}
  assert decays == {"scratch": (5e-4, 5e-4), "finetune_l2": (5e-4, 5e-4),
                    **{m: (0.0, 0.01) for m in (
                        "l2_sp", "delta", "feature_matching", "ot")}}
  assert first_regimes.get_sweep("study=data_scarcity")["finetune_l2"] == (
      common.GRIDS["finetune_l2"])


def test_contrasts_pair_omega_p_with_every_other_method_and_kd():
  assert common.contrasts(
      ["student", "kd", "fitnets", "ot", "ot_uniform", "ot_kd"],
      "student") == [("ot", "kd"), ("ot", "fitnets"), ("ot", "ot_uniform"),
                     ("ot_kd", "kd")]
  # Without ot or without kd: nothing to pair them with.
  assert common.contrasts(["scratch", "l2_sp"], "scratch") == []
  assert common.contrasts(["scratch", "ot", "ot_kd"], "scratch") == []
  # Every settings config: each control is one of Omega_P's pairs.
  for spec in ("transfer.py:data=fashion_mnist", "distill.py:data=digits",
               "cross_arch.py:data=fashion_mnist"):
    module = runs.load_config_module(os.path.join(REPO, "experiments/configs",
                                                  spec))
    pairs = common.contrasts(module.methods, module.baseline)
    assert {("ot", c) for c in common.OT_CONTROLS} <= set(pairs), spec
