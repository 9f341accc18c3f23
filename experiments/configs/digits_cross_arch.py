"""Cross-architecture transfer: a digits 0-4 teacher -> a narrower student on 5-9.

The teacher is digits_transfer's (digits_cnn trained on digits 0-4, cached in
WORKDIR/teacher). The student is a digits_cnn of half the width (8/16/32
neurons per stage against 16/32/64) learning digits 5-9 from
`samples_per_class` images per class. It cannot start from the teacher's
weights, and the label spaces differ (no KD); what transfers is the
representation:

  scratch    CE only
  attention  CE + attention transfer on stage1-2
  fitnets    CE + FitNets hint on stage2 (learned 1x1 regressor)
  ot         CE + Omega_P on stage1-3 (widths differ: no projection needed)

Launch one method (default: ot):
  python -m experiments.main \
      --config experiments/configs/digits_cross_arch.py:ot \
      --workdir workdirs/digits_cross_arch/ot
All methods x seeds:
  python -m experiments.reproduce \
      --config experiments/configs/digits_cross_arch.py --seeds 3
"""

from experiments.configs import common, digits_transfer

LAYERS = ("stage1", "stage2", "stage3")


def experiment():
  c = digits_transfer.experiment()
  c.model.kwargs = {"width": 0.5}
  c.analysis.layers = ()  # Unequal widths: no matched fraction to plot.
  c.loss.weight_decay = 5e-4
  c.loss.head_decay = 5e-4
  return c


METHODS = {
    "scratch": common.unchanged,  # CE and weight decay only.
    "attention": common.with_term("attention", 100.0,
                                  student_layers=("stage1", "stage2")),
    "fitnets": common.with_term("fitnets", 1.0, student_layers=("stage2",)),
    "ot": common.with_term("ot", 0.1, student_layers=LAYERS),
}


def get_config(method=None):
  return common.select_method(experiment(), METHODS, method)
