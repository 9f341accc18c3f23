"""A CNN teacher distilled into a ViT student: small_cnn width 2 -> vit width 16, Fashion-MNIST.

fashion_mnist_distill's teacher (small_cnn width 2, 94 k parameters, all ten
classes, cached in WORKDIR/teacher) and protocol, with
fashion_mnist_vit_distill's student (vit width 16, depth 2, 5.7 k
parameters, 4 x 4 patches). The student's last block holds 7 x 7 = 49 tokens,
the teacher's stage3 a 7 x 7 grid of 128 channels: with spatial="flatten"
Omega_P compares token i with grid position i (row-major, the order of the
patches), 16 student neurons with 128 teacher channels:

  student    CE and weight decay only
  kd         CE + KD (T = 4)
  ot         CE + Omega_P, student block1 <-> teacher stage3
  ot_kd      CE + Omega_P + KD, each weight as chosen for ot and kd alone

Each weight is the best on the validation split of tuning seed 100 out of
0.1x, 1x and 10x a customary value, chosen by
  python -m experiments.sweep \
      --config experiments/configs/fashion_mnist_vit_cross_arch.py --seed 100
(docs/fashion_mnist/fashion_mnist_vit_cross_arch/sweep.md).

All methods x seeds, table and figures:
  python -m experiments.reproduce \
      --config experiments/configs/fashion_mnist_vit_cross_arch.py --seeds 5
The teacher is fashion_mnist_distill's: --config.teacher.workdir=DIR shares
one cached teacher between the two configs.
"""

from experiments.configs import common, distill
from experiments.configs import fashion_mnist_vit_distill as vit_distill

SWEEP = {
    "kd": ("loss.terms.kd.weight", (0.1, 1.0, 10.0)),
    "ot": ("loss.terms.ot.weight", (0.01, 0.1, 1.0)),
}
# fashion_mnist_distill's choices, until the sweep above has run on this
# config (it had not finished on the 2-core machine of the first session).
WEIGHTS = {"kd": 10.0, "ot": 0.1}


def experiment():
  c = distill.experiment("fashion_mnist")  # small_cnn width 2 teacher
  vit_distill.vit(c, vit_distill.STUDENT)
  return c


METHODS = vit_distill.methods(WEIGHTS, student_layers=("block1",),
                              teacher_layers=("stage3",))


def get_config(method=None):
  return common.select_method(experiment(), METHODS, method)
