"""CIFAR-100 distillation: resnet32x4 (teacher) -> resnet8x4 (student).

Protocol, teacher and methods: `paper.cifar100_distillation` (RepDistiller's
240-epoch protocol; the teacher is trained first, once). Stage resolutions
and widths are equal in the teacher and the student: 32x32x64, 16x16x128, 8x8x256.

Launch one method:
  python -m experiments.main \
      --config experiments/configs/cifar100_resnet32x4_resnet8x4.py:ot \
      --workdir workdirs/cifar100_resnet32x4_resnet8x4/ot \
      --config.teacher.workdir=workdirs/cifar100_resnet32x4_resnet8x4/teacher
All methods x seeds, table and figures:
  python -m experiments.reproduce \
      --config experiments/configs/cifar100_resnet32x4_resnet8x4.py --seeds 3

Reference (RepDistiller, last epoch): student 72.50, KD 73.33, FitNet 73.50, AT 73.44, CRD 75.51.
"""

from experiments.configs import common, paper


def get_config(method=None):
  return common.select_method(*paper.cifar100_distillation("resnet32x4", "resnet8x4"), method)
