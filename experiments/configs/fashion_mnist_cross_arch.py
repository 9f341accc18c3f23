"""A smaller student of another architecture on a new task: resnet8 (0-4) -> small_cnn (5-9).

The teacher is a CIFAR-style resnet8 (16/32/64 channels, 78 k parameters)
trained on all training images of Fashion-MNIST classes 0-4 but 500 per class
(cached in WORKDIR/teacher). The student, a plain small_cnn of width 0.5
(8/16/32 channels, 6.3 k parameters: 12x fewer), learns classes 5-9 from
K = 10 images per class, with fashion_mnist_transfer's data, schedule and
seeds. It cannot start from the teacher's weights, and the label spaces
differ (no KD); what transfers is the representation. The stage outputs of
both networks are 28, 14 and 7 pixels wide, so every method compares stage
with stage:

  scratch    CE and weight decay
  fitnets    CE + FitNets hint on stage2 (learned 1x1 regressor)
  attention  CE + attention transfer on stage1-3
  ot         CE + Omega_P on stage1-3 (widths differ: no projection needed)

Each weight is the best on the validation split of tuning seed 100 out of
0.1x, 1x and 10x a customary value, chosen by
  python -m experiments.sweep \
      --config experiments/configs/fashion_mnist_cross_arch.py --seed 100
(docs/fashion_mnist/fashion_mnist_cross_arch/sweep.md).

Launch one method (default: ot):
  python -m experiments.main \
      --config experiments/configs/fashion_mnist_cross_arch.py:ot \
      --workdir workdirs/fashion_mnist_cross_arch/ot
All methods x seeds, table and figures:
  python -m experiments.reproduce \
      --config experiments/configs/fashion_mnist_cross_arch.py --seeds 5
"""

from experiments.configs import common, fashion_mnist_transfer

LAYERS = ("stage1", "stage2", "stage3")

SWEEP = {
    "fitnets": ("loss.terms.fitnets.weight", (0.1, 1.0, 10.0)),
    "attention": ("loss.terms.attention.weight", (10.0, 100.0, 1000.0)),
    "ot": ("loss.terms.ot.weight", (0.01, 0.1, 1.0)),
}
# Chosen by the sweep above (validation accuracy, seed 100).
WEIGHTS = {"fitnets": 0.1, "attention": 10.0, "ot": 0.01}


def teacher_job():
  t = fashion_mnist_transfer.teacher_job()
  t.model.name = "resnet8"
  return t


def experiment():
  c = fashion_mnist_transfer.experiment()
  c.model.kwargs = {"width": 0.5}
  c.teacher.name = "resnet8"
  c.teacher.job = teacher_job()
  c.analysis.layers = ()  # Unequal widths: no matched fraction (trace) to plot.
  c.loss.weight_decay = 5e-4
  c.loss.head_decay = 5e-4
  return c


METHODS = {
    "scratch": common.unchanged,  # CE and weight decay only.
    "fitnets": common.with_term("fitnets", WEIGHTS["fitnets"],
                                student_layers=("stage2",)),
    "attention": common.with_term("attention", WEIGHTS["attention"],
                                  student_layers=LAYERS),
    "ot": common.with_term("ot", WEIGHTS["ot"], student_layers=LAYERS),
}


def get_config(method=None):
  return common.select_method(experiment(), METHODS, method)
