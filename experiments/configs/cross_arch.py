"""Cross-architecture transfer: a teacher on classes 0-4 -> a smaller student of another architecture on 5-9.

One config for the setting; the dataset is an argument. Data, seeds,
schedule and the protocol (teacher seed common.TEACHER_SEED, the teacher's
input normalisation, one weight decay and head decay common.DECAY for every
method) are transfer.py's for the same dataset:

  data=digits         teacher: transfer.py's (digits_cnn, 16/32/64 neurons per
                      stage); student: digits_cnn of half the width (8/16/32)
  data=fashion_mnist  teacher: a CIFAR-style resnet8 (16/32/64 channels, 78 k
                      parameters); student: a plain small_cnn of width 0.5
                      (8/16/32 channels, 6.3 k parameters: 12x fewer). The
                      stage outputs of both are 28, 14 and 7 pixels wide, so
                      every method compares stage with stage

The student cannot start from the teacher's weights, and the label spaces
differ (no KD); what transfers is the representation:

  scratch    CE and weight decay only
  attention  CE + attention transfer (digits: stage1-2; fashion_mnist: 1-3)
  fitnets    CE + FitNets hint on stage2 (learned 1x1 regressor)
  ot         CE + Omega_P on stage1-3 (widths differ: no projection needed)
  ot_uniform      ot with a uniform plan (relative_epsilon 1e4): no neuron
                  matching, only a pull on the layer's moments
  ot_standardize  ot on standardised neurons (normalize="standardize")

The two controls of Omega_P (common.OT_CONTROLS) run at ot's weight; the
regime studies (regimes.py) tune them separately.

On Fashion-MNIST each weight is the best mean validation accuracy of tuning
seeds 100 and 101 out of 0.1x, 1x and 10x a customary value (a grid whose
best is at an edge extended 10x that way, at most twice), chosen by
  python -m experiments.sweep \
      --config experiments/configs/cross_arch.py:data=fashion_mnist \
      --tuning_seeds 100,101 --out docs/fashion_mnist/fashion_mnist_cross_arch
(docs/fashion_mnist/fashion_mnist_cross_arch/sweep.md).

Launch one method (default: data=digits, method=ot):
  python -m experiments.main \
      --config experiments/configs/cross_arch.py:data=digits,method=ot \
      --workdir workdirs/digits_cross_arch/ot
All methods x seeds, table and figures (runs in workdirs/reproduce/<data>_cross_arch;
the committed table's records, table and figures in its --out, where a rerun
reuses them and trains nothing):
  python -m experiments.reproduce \
      --config experiments/configs/cross_arch.py:data=digits --seeds 3
  python -m experiments.reproduce \
      --config experiments/configs/cross_arch.py:data=fashion_mnist --seeds 10 \
      --out docs/fashion_mnist/fashion_mnist_cross_arch
"""

from experiments.configs import common, transfer

TEACHER_MODEL = {"digits": "digits_cnn", "fashion_mnist": "resnet8"}

SWEEP = {"fashion_mnist": common.grids("fitnets", "attention", "ot")}
# Each term's weight (fashion_mnist: chosen by the sweep above, mean
# validation accuracy of tuning seeds 100 and 101, every choice bracketed:
# docs/fashion_mnist/fashion_mnist_cross_arch/sweep.md; digits: exploratory,
# no sweep); the methods of a dataset are scratch and these, in this order.
# The layers each term reads: common.TERM_LAYERS.
WEIGHTS = {
    "digits": {"attention": 100.0, "fitnets": 1.0, "ot": 0.1},
    "fashion_mnist": {"fitnets": 0.1, "attention": 1.0, "ot": 0.01},
}


def experiment(data: str = "digits"):
  """Everything the methods share."""
  c = transfer.experiment(data)
  c.model.kwargs = {"width": 0.5}
  c.teacher.job.model.name = TEACHER_MODEL[data]
  c.analysis.layers = ()  # Unequal widths: no matched fraction (trace) to plot.
  return c


get_sweep = common.sweeps(SWEEP)  # experiments.sweep's grids.


def get_methods(arg=None) -> dict:
  """``{method: Method}`` of ``arg``'s dataset, scratch (the baseline) first."""
  data = common.setting_arg(arg)[0]
  return common.teacher_terms("scratch", WEIGHTS[data], data)


def get_config(arg=None):
  """``arg``: ``data=digits|fashion_mnist,method=<method>,smoke=False`` (or
  a method)."""
  data, method, smoke = common.setting_arg(arg)
  c = experiment(data)
  if smoke:
    common.shrink(c, *common.SMOKE[data])
  return common.select_method(c, get_methods(arg), method)
