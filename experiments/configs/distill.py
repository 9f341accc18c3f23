"""Knowledge distillation: a wide teacher -> a narrow student, same data.

One config for the setting; the dataset is an argument:

  data=digits         digits_cnn (16/32/64 neurons per stage) -> digits_cnn
                      width 0.25 (4/8/16), all ten digits, validation 20 per
                      class, 300 steps of 64
  data=fashion_mnist  small_cnn width 2 (32/64/128 channels, 94 k parameters)
                      -> width 0.5 (8/16/32, 6.3 k parameters, about 15x fewer
                      multiply-adds), all training images but 200 per class
                      kept for validation, 300 steps of batch 128 (0.7 epoch:
                      a short budget, where what the teacher adds shows)

The teacher is trained on the same task and split, with seed
common.TEACHER_SEED (1000), and cached in WORKDIR/teacher. Every method has
the same weight decay and head decay (common.DECAY, 5e-4) and reads inputs
normalised with the teacher's statistics (teacher_normalization; its
training split is the students', so these are the split's own), as the
protocol of docs/experiments.md wants. The widths differ, so Omega_I and
DELTA do not apply; Omega_P needs no projection:

  student    CE and weight decay only
  kd         CE + KD (T = 4)
  fitnets    CE + FitNets hint on stage2 (learned 1x1 regressor)
  attention  CE + attention transfer (digits: stage1-2; fashion_mnist: 1-3)
  ot         CE + Omega_P on stage1-3
  ot_uniform      ot with a uniform plan (relative_epsilon 1e4): no neuron
                  matching, only a pull on the layer's moments
  ot_standardize  ot on standardised neurons (normalize="standardize")
  ot_kd      CE + Omega_P + KD, each weight as chosen for ot and kd alone

The two controls of Omega_P (common.OT_CONTROLS) run at ot's weight; the
regime studies (regimes.py) tune them separately.

The teacher trained on this very split, so data.seed stays fixed
(vary_data_seed=False): seeds change the student's initialisation and batch
order. On Fashion-MNIST each weight is the best mean validation accuracy of
tuning seeds 100 and 101 out of 0.1x, 1x and 10x a customary value (a grid
whose best is at an edge extended 10x that way, at most twice), chosen by
  python -m experiments.sweep \
      --config experiments/configs/distill.py:data=fashion_mnist \
      --tuning_seeds 100,101 --out docs/fashion_mnist/fashion_mnist_distill
(docs/fashion_mnist/fashion_mnist_distill/sweep.md).

Launch one method (default: data=digits, method=ot):
  python -m experiments.main \
      --config experiments/configs/distill.py:data=digits,method=ot \
      --workdir workdirs/digits_distill/ot
All methods x seeds, table and figures (runs in workdirs/reproduce/<data>_distill;
the committed table's records, table and figures in its --out, where a rerun
reuses them and trains nothing):
  python -m experiments.reproduce \
      --config experiments/configs/distill.py:data=digits --seeds 3
  python -m experiments.reproduce \
      --config experiments/configs/distill.py:data=fashion_mnist --seeds 10 \
      --out docs/fashion_mnist/fashion_mnist_distill
KD needs the teacher's label space: with --config.data.classes=..., set
--config.teacher.job.data.classes to the same classes.
"""

from experiments.configs import common

MODEL = {"digits": "digits_cnn", "fashion_mnist": "small_cnn"}
WIDTH = {"digits": (1.0, 0.25), "fashion_mnist": (2.0, 0.5)}  # teacher, student

SWEEP = {"fashion_mnist": common.grids("kd", "fitnets", "attention", "ot")}
# Each term's weight (fashion_mnist: chosen by the sweep above, mean
# validation accuracy of tuning seeds 100 and 101, every choice bracketed:
# docs/fashion_mnist/fashion_mnist_distill/sweep.md; digits: exploratory,
# no sweep); the methods of a dataset are student, these in this order, and
# ot_kd. The layers each term reads: common.TERM_LAYERS.
WEIGHTS = {
    "digits": {"kd": 1.0, "fitnets": 1.0, "attention": 100.0, "ot": 1.0},
    "fashion_mnist": {"kd": 10.0, "fitnets": 0.1, "attention": 100.0,
                      "ot": 0.1},
}

# Per dataset: the teacher's job and the students' (same data).
TEACHER_JOB = {
    "digits": {"batch_size": 64, "num_steps": 400, "eval_every": 100,
               "log_every": 25, "checkpoint_every": 100},
    # 800 steps: 1.9 epochs of 58,000 images.
    "fashion_mnist": {"batch_size": 128, "num_steps": 800, "eval_every": 400,
                      "log_every": 100, "checkpoint_every": 800},
}
STUDENT_JOB = {
    "digits": {"batch_size": 64, "num_steps": 300, "eval_every": 50,
               "log_every": 25, "checkpoint_every": 100},
    "fashion_mnist": {"batch_size": 128, "num_steps": 300, "eval_every": 75,
                      "log_every": 75, "checkpoint_every": 300},
}


def _job(c, data: str, width: float, settings: dict) -> None:
  c.data.name = data
  c.data.val_per_class = {"digits": 20, "fashion_mnist": 200}[data]
  c.model.name = MODEL[data]
  if width != 1.0:
    c.model.kwargs = {"width": width}
  c.loss.weight_decay = c.loss.head_decay = common.DECAY
  c.update(settings)
  c.max_devices = common.MAX_DEVICES[data]


def teacher_job(data: str):
  t = common.base_config()
  _job(t, data, WIDTH[data][0], TEACHER_JOB[data])
  t.seed = common.TEACHER_SEED  # No student seed is (the protocol).
  return t


def experiment(data: str = "digits"):
  """Everything the methods share."""
  c = common.base_config()
  _job(c, data, WIDTH[data][1], STUDENT_JOB[data])
  c.vary_data_seed = False  # The teacher trained on this same split.
  c.teacher.source = "train"
  c.teacher.job = teacher_job(data)
  c.teacher_normalization = True  # The protocol's; here the split's own.
  c.method = "ot"
  return c


get_sweep = common.sweeps(SWEEP)  # experiments.sweep's grids.


def get_methods(arg=None) -> dict:
  """``{method: Method}`` of ``arg``'s dataset, student (the baseline) first."""
  data = common.setting_arg(arg)[0]
  return common.teacher_terms("student", WEIGHTS[data], data)


def get_config(arg=None):
  """``arg``: ``data=digits|fashion_mnist,method=<method>,smoke=False`` (or
  a method)."""
  data, method, smoke = common.setting_arg(arg)
  c = experiment(data)
  if smoke:
    common.shrink(c, *common.SMOKE[data])
  return common.select_method(c, get_methods(arg), method)
