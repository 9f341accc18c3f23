"""CIFAR-100 distillation: a teacher -> a student of the same family; the pair is an argument.

Protocol, teacher and methods: `paper.cifar100_distillation` (RepDistiller's
240-epoch protocol; the teacher is trained first, once). Stage resolutions
and widths are equal in the teacher and the student:

  pair=resnet56_resnet20      resnet56 -> resnet20: 32x32x16, 16x16x32, 8x8x64
  pair=resnet32x4_resnet8x4   resnet32x4 -> resnet8x4: 32x32x64, 16x16x128,
                              8x8x256
  pair=wrn40_2_wrn16_2        wrn_40_2 -> wrn_16_2: 32x32x32, 16x16x64,
                              8x8x128

Launch one method (default: pair=resnet56_resnet20, method=ot):
  python -m experiments.main \
      --config experiments/configs/cifar100.py:pair=resnet56_resnet20,method=ot \
      --workdir workdirs/cifar100_resnet56_resnet20/ot \
      --config.teacher.workdir=workdirs/cifar100_resnet56_resnet20/teacher
All methods x seeds, table and figures:
  python -m experiments.reproduce \
      --config experiments/configs/cifar100.py:pair=resnet56_resnet20 --seeds 3
smoke=True: one step of batch 4 for the teacher and the student
(paper.smoke).

Reference (RepDistiller, last epoch):
  resnet56_resnet20     student 69.06, KD 70.66, FitNet 69.21, AT 70.55, CRD 71.16
  resnet32x4_resnet8x4  student 72.50, KD 73.33, FitNet 73.50, AT 73.44, CRD 75.51
  wrn40_2_wrn16_2       student 73.26, KD 74.92, FitNet 73.58, AT 74.08, CRD 75.48
"""

from experiments.configs import common, paper

# pair -> (teacher, student) model names.
PAIRS = {
    "resnet56_resnet20": ("resnet56", "resnet20"),
    "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
    "wrn40_2_wrn16_2": ("wrn_40_2", "wrn_16_2"),
}


def _arg(arg) -> dict:
  a = common.parse_arg(arg, pair="resnet56_resnet20", method="",
                       smoke="False")
  if a["pair"] not in PAIRS:
    raise ValueError(f"Unknown pair={a['pair']!r}; choose one of "
                     f"{tuple(PAIRS)} with --config=cifar100.py:pair=<name>.")
  return a


def get_methods(arg=None) -> dict:
  """``{method: Method}`` (the same for every pair), student (the baseline)
  first."""
  _arg(arg)
  return paper.cifar100_methods()


def get_config(arg=None):
  """``arg``: ``pair=<pair>,method=<method>,smoke=False`` (or a method)."""
  a = _arg(arg)
  c = paper.cifar100_distillation(*PAIRS[a["pair"]])
  if common.flag(a["smoke"]):
    paper.smoke(c)
  return common.select_method(c, get_methods(arg), a["method"])
