"""CIFAR-100 distillation: wrn_40_2 (teacher) -> wrn_16_2 (student).

Protocol, teacher and methods: `paper.cifar100_distillation` (RepDistiller's
240-epoch protocol; the teacher is trained first, once). Stage resolutions
and widths are equal in the teacher and the student: 32x32x32, 16x16x64, 8x8x128.

Launch one method:
  python -m experiments.main \
      --config experiments/configs/cifar100_wrn40_2_wrn16_2.py:ot \
      --workdir workdirs/cifar100_wrn40_2_wrn16_2/ot \
      --config.teacher.workdir=workdirs/cifar100_wrn40_2_wrn16_2/teacher
All methods x seeds, table and figures:
  python -m experiments.reproduce \
      --config experiments/configs/cifar100_wrn40_2_wrn16_2.py --seeds 3

Reference (RepDistiller, last epoch): student 73.26, KD 74.92, FitNet 73.58, AT 74.08, CRD 75.48.
"""

from experiments.configs import common, paper


def get_config(method=None):
  return common.select_method(*paper.cifar100_distillation("wrn_40_2", "wrn_16_2"), method)
