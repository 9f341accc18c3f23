"""Knowledge distillation: digits_cnn teacher -> a 4x narrower student.

The teacher (digits_cnn, 16/32/64 neurons per stage) is trained on all ten
digits and cached in WORKDIR/teacher; the student (digits_cnn width 0.25:
4/8/16 neurons) learns the same task from the same data. The widths differ,
so Omega_I (feature matching) does not apply; Omega_P needs no projection.

  student    CE only
  kd         CE + KD (T = 4)
  fitnets    CE + FitNets hint on stage2 (learned 1x1 regressor)
  attention  CE + attention transfer on stage1-2
  ot         CE + Omega_P on stage1-3
  ot_kd      CE + Omega_P + KD

Launch one method (default: ot):
  python -m experiments.main \
      --config experiments/configs/digits_distill.py:ot \
      --workdir workdirs/digits_distill/ot
All methods x seeds:
  python -m experiments.reproduce \
      --config experiments/configs/digits_distill.py --seeds 3
"""

from experiments.configs import common

LAYERS = ("stage1", "stage2", "stage3")


def teacher_job():
  t = common.base_config()
  t.data.val_per_class = 20
  t.model.name = "digits_cnn"
  t.loss.weight_decay = 5e-4
  t.loss.head_decay = 5e-4
  t.num_steps = 400
  t.eval_every = 100
  # Digits steps take milliseconds: one device gives the README's numbers
  # bit for bit on any machine (more devices only change float rounding,
  # which 25-image training amplifies to a few test images).
  t.max_devices = 1
  return t


def experiment():
  c = common.base_config()
  c.data.val_per_class = 20
  c.vary_data_seed = False  # The teacher trained on this same split.
  c.model.name = "digits_cnn"
  c.model.kwargs = {"width": 0.25}
  c.teacher.source = "train"
  c.teacher.name = "digits_cnn"
  c.teacher.job = teacher_job()
  c.loss.weight_decay = 5e-4
  c.loss.head_decay = 5e-4
  c.num_steps = 300
  c.eval_every = 50
  c.method = "ot"
  c.baseline_method = "student"
  # Digits steps take milliseconds: one device gives the README's numbers
  # bit for bit on any machine (more devices only change float rounding,
  # which 25-image training amplifies to a few test images).
  c.max_devices = 1
  return c


kd = common.with_term("kd", 1.0)
ot = common.with_term("ot", 1.0, student_layers=LAYERS)
METHODS = {
    "student": common.unchanged,  # CE and weight decay only.
    "kd": kd,
    "fitnets": common.with_term("fitnets", 1.0, student_layers=("stage2",)),
    "attention": common.with_term("attention", 100.0,
                                  student_layers=("stage1", "stage2")),
    "ot": ot,
    "ot_kd": common.combine(ot, kd),
}


def get_config(method=None):
  return common.select_method(experiment(), METHODS, method)
