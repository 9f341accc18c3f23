"""Student size: a small_cnn of width 0.25 .. 2 x the teacher's, from random initialisation.

``transfer.py:data=fashion_mnist``'s teacher (small_cnn, width 1, classes
0-4) and data (classes 5-9, K = 10 images per class, full batch, 150 steps); the student is
a small_cnn of width ``model.kwargs.width`` (stages of 16w / 32w / 64w
channels) trained from random initialisation with weight decay 5e-4 (body and
head), so that only the term differs between methods:

  scratch           no term
  attention         attention transfer on stage1-3
  fitnets           FitNets hint on stage2 (learned 1x1 regressor)
  feature_matching  Omega_I on stage1-3: only where the widths are equal
                    (``applies``), index matching needs as many neurons
  ot                Omega_P on stage1-3 (any widths)

The study (docs/regimes/student_size; weights chosen per width on the
tuning seed's validation split):
  python -m experiments.curve \
      --config experiments/configs/fashion_mnist_width.py \
      --key model.kwargs.width --values 0.25,0.5,1.0,2.0 --seeds 5 --tuning_seeds 100 \
      --out docs/regimes/student_size \
      --workdir workdirs/regimes/student_size \
      --config.teacher.workdir=workdirs/regimes/teacher
"""

from experiments.configs import common, transfer

LAYERS = common.LAYERS

SWEEP = {
    "attention": ("loss.terms.attention.weight", (10.0, 100.0, 1000.0)),
    "fitnets": ("loss.terms.fitnets.weight", (0.1, 1.0, 10.0)),
    "feature_matching": ("loss.terms.feature_matching.weight",
                         (0.01, 0.1, 1.0)),
    "ot": ("loss.terms.ot.weight", (0.01, 0.1, 1.0)),
}


def experiment():
  c = transfer.experiment("fashion_mnist")
  c.model.kwargs = {"width": 1.0}
  c.loss.weight_decay = 5e-4
  c.loss.head_decay = 5e-4
  return c


METHODS = {
    "scratch": common.unchanged,
    "attention": common.with_term("attention", 100.0, student_layers=LAYERS),
    "fitnets": common.with_term("fitnets", 1.0, student_layers=("stage2",)),
    "feature_matching": common.with_term("feature_matching", 0.1,
                                         student_layers=LAYERS),
    "ot": common.with_term("ot", 0.1, student_layers=LAYERS),
}


def applies(method, config) -> bool:
  """Omega_I compares neuron i with neuron i: equal widths only."""
  width = config.model.kwargs.width
  return method != "feature_matching" or width == config.teacher.kwargs.get(
      "width", 1.0)


def get_config(method=None):
  return common.select_method(experiment(), METHODS, method)
