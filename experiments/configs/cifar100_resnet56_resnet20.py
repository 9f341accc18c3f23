"""CIFAR-100 distillation: resnet56 (teacher) -> resnet20 (student).

Protocol, teacher and methods: `paper.cifar100_distillation` (RepDistiller's
240-epoch protocol; the teacher is trained first, once). Stage resolutions
and widths are equal in the teacher and the student: 32x32x16, 16x16x32, 8x8x64.

Launch one method:
  python -m experiments.main \
      --config experiments/configs/cifar100_resnet56_resnet20.py:ot \
      --workdir workdirs/cifar100_resnet56_resnet20/ot \
      --config.teacher.workdir=workdirs/cifar100_resnet56_resnet20/teacher
All methods x seeds, table and figures:
  python -m experiments.reproduce \
      --config experiments/configs/cifar100_resnet56_resnet20.py --seeds 3

Reference (RepDistiller, last epoch): student 69.06, KD 70.66, FitNet 69.21, AT 70.55, CRD 71.16.
"""

from experiments.configs import common, paper


def get_config(method=None):
  return common.select_method(*paper.cifar100_distillation("resnet56", "resnet20"), method)
