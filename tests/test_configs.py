"""Config arguments (``file.py:data=...,method=...``), the per-dataset aliases,
and how the tools read a config file (experiments.runs). Fast: configs only, no run."""

import os

import pytest

from experiments import cli, runs
from experiments.configs import common, cross_arch, distill, transfer

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
def test_the_old_per_dataset_files_are_the_same_configs(setting, data):
  module = SETTINGS[setting]
  alias = runs.load_config_module(
      os.path.join(REPO, f"experiments/configs/{data}_{setting}.py"))
  default = module.get_config(f"data={data}")
  assert alias.get_config().to_json() == default.to_json()
  assert default.data.name == data
  for method in default.method_order:
    new = module.get_config(f"data={data},method={method}")
    assert new.method == method
    assert alias.get_config(method).to_json() == new.to_json(), method
  assert alias.SWEEP == module.get_sweep(f"data={data}")


@pytest.mark.parametrize("setting", SETTINGS)
def test_reproduce_reads_a_config_with_arguments(setting):
  path = os.path.join(REPO, f"experiments/configs/{setting}.py:"
                      "data=fashion_mnist,method=ot")
  assert cli.config_name(path) == f"fashion_mnist_{setting}"
  assert cli.config_name(path.split(":")[0]) == setting
  module = runs.load_config_module(path)
  default = module.get_config()
  assert default.method == "ot" and default.data.name == "fashion_mnist"
  for method in default.method_order:  # data=... kept for every method.
    c = module.get_config(method)
    assert (c.method, c.data.name) == (method, "fashion_mnist")
  assert module.SWEEP and set(module.SWEEP) <= set(default.method_order)
  # Digits has no sweep: its weights came from an exploratory one.
  assert runs.load_config_module(
      path.replace("fashion_mnist", "digits")).SWEEP == {}


def test_digits_configs_run_on_one_device_and_fashion_mnist_on_all():
  for setting, module in SETTINGS.items():
    for data in DATASETS:
      c = module.get_config(f"data={data}")
      expected = common.MAX_DEVICES[data]
      assert c.max_devices == c.teacher.job.max_devices == expected, setting
