"""CIFAR-100 distillation: resnet32x4 (teacher) -> resnet8x4 (student).

RepDistiller's protocol (Tian et al., ICLR 2020): 240 epochs of SGD (momentum
0.9, lr 0.05 divided by 10 at epochs 150, 180 and 210), weight decay 5e-4,
batch 64, random crop (pad 4) + horizontal flip. 50 images per class are
carved out of the training split for model selection (45,000 left, 704 steps
per epoch, 168,960 steps); the test split gives the reported numbers, at the
last step and at the best-validation step. Evaluation every epoch, a
checkpoint every 2 epochs. Stage resolutions (and widths) are equal in the
teacher and the student: 32x32x64, 16x16x128, 8x8x256.

The teacher is trained here, by the same protocol with CE only
(`teacher.source='train'`, `teacher.job`), once, in `teacher.workdir`
(`experiments.reproduce` uses WORKDIR/teacher; with `experiments.main` pass
`--config.teacher.workdir` so that methods share it). To reuse a finished
run instead: `--config.teacher.source=checkpoint
--config.teacher.path=workdirs/.../teacher`.

Methods (CE is always there; RepDistiller's weights where it has them):
  student           CE only
  kd                + KD, T=4, kd_weight 1 (ours is CE + w KD)
  fitnets           + hint on stage3 (1x1 regressor), weight 100
  attention         + AT on stage1-3, weight 1000
  feature_matching  + Omega_I on stage1-3 (equal widths), weight 1 (UNTUNED)
  ot                + Omega_P on stage1-3, spatial='flatten', weight 1 (UNTUNED)
  ot_kd             ot + kd

Launch one method:
  python -m experiments.main \
      --config experiments/configs/cifar100_resnet32x4_resnet8x4.py \
      --workdir workdirs/cifar100_resnet32x4_resnet8x4/ot --config.method=ot \
      --config.teacher.workdir=workdirs/cifar100_resnet32x4_resnet8x4/teacher
All methods x seeds, table and figures:
  python -m experiments.reproduce \
      --config experiments/configs/cifar100_resnet32x4_resnet8x4.py --seeds 3

Reference (RepDistiller, last epoch): student 72.50, KD 73.33, FitNet 73.50, AT 73.44, CRD 75.51.
"""

from experiments.configs import paper


def get_config():
  return paper.cifar100_distillation("resnet32x4", "resnet8x4")
