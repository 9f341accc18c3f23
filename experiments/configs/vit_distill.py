"""Distillation into a ViT student (vit width 16, depth 2), Fashion-MNIST; the teacher is an argument.

distill.py:data=fashion_mnist's protocol (all ten classes, 200 validation
images per class, the teacher trained on the same split and cached in
WORKDIR/teacher, 300 student steps of batch 128, seeds) with a ViT student:
4 x 4 patches, so every block holds 7 x 7 = 49 tokens (vit width 16, depth 2,
5.7 k parameters). SGD as for the CNNs, with a 50-step warm-up and gradient
clipping (norm 1), which a transformer trained by SGD needs. The widths
differ, so Omega_I (feature matching) and DELTA do not apply:

  teacher=vit        a ViT twice as wide (vit width 32, depth 2, 19.6 k
                     parameters, trained here with the same optimiser).
                     Omega_P compares each block's residual stream,
                     (batch, 49 tokens, 16) with (batch, 49, 32), tokens as
                     positions (spatial="flatten"), on block0 and block1
  teacher=small_cnn  distill.py's CNN teacher (small_cnn width 2, 94 k
                     parameters). The student's last block holds 49 tokens,
                     the teacher's stage3 a 7 x 7 grid of 128 channels: with
                     spatial="flatten" Omega_P compares token i with grid
                     position i (row-major, the order of the patches),
                     student block1 <-> teacher stage3

  student    CE and weight decay only
  kd         CE + KD (T = 4)
  ot         CE + Omega_P (the layers above)
  ot_uniform      ot with a uniform plan (relative_epsilon 1e4): no neuron
                  matching, only a pull on the layer's moments
  ot_standardize  ot on standardised neurons (normalize="standardize")
  ot_kd      CE + Omega_P + KD, each weight as chosen for ot and kd alone

The two controls of Omega_P (common.OT_CONTROLS) run at ot's weight; the
regime studies (regimes.py) tune them separately.

distill.py's protocol includes its teacher seed (common.TEACHER_SEED), the
teacher's input normalisation and one weight and head decay (common.DECAY)
for every method. Each weight is the best mean validation accuracy of tuning
seeds 100 and 101 out of 0.1x, 1x and 10x a customary value, chosen by
  python -m experiments.sweep \
      --config experiments/configs/vit_distill.py:teacher=vit \
      --tuning_seeds 100,101
(docs/fashion_mnist/fashion_mnist_vit_distill/sweep.md holds the sweep made
before this protocol, on seed 100 with a teacher of seed 0, which chose the
weights below); teacher=small_cnn uses distill.py's choices until its sweep,
  python -m experiments.sweep \
      --config experiments/configs/vit_distill.py:teacher=small_cnn \
      --tuning_seeds 100,101
has run.

All methods x seeds, table and figures:
  python -m experiments.reproduce \
      --config experiments/configs/vit_distill.py:teacher=vit --seeds 5
  python -m experiments.reproduce \
      --config experiments/configs/vit_distill.py:teacher=small_cnn --seeds 5
teacher=small_cnn's teacher is distill.py:data=fashion_mnist's:
--config.teacher.workdir=DIR shares one cached teacher between the two
configs. smoke=True: common.SMOKE's Fashion-MNIST sizes.
"""

from experiments.configs import common, distill

DATA = "fashion_mnist"
TEACHERS = ("vit", "small_cnn")
TEACHER = {"width": 32, "depth": 2}  # teacher=vit
STUDENT = {"width": 16, "depth": 2}

SWEEP = common.grids("kd", "ot")
# Per teacher: each weight (vit: chosen by the sweep above, validation
# accuracy, seed 100, docs/fashion_mnist/fashion_mnist_vit_distill/sweep.json;
# small_cnn: distill.py's Fashion-MNIST choices, until its sweep has run on
# this config: it had not finished on the 2-core machine of the first
# session) and the Omega_P term's layers.
WEIGHTS = {"vit": {"kd": 0.1, "ot": 0.1},
           "small_cnn": {"kd": 10.0, "ot": 0.1}}
OT_LAYERS = {"vit": {"student_layers": ("block0", "block1")},
             "small_cnn": {"student_layers": ("block1",),
                           "teacher_layers": ("stage3",)}}


def vit(c, kwargs):
  """``c`` trains a ViT: the model, and SGD with warm-up and clipping."""
  c.model.name = "vit"
  c.model.kwargs = dict(kwargs)
  c.optimizer.warmup_steps = 50
  c.optimizer.grad_clip_norm = 1.0


def experiment(teacher: str = "vit"):
  """Everything the methods share."""
  c = distill.experiment(DATA)  # small_cnn width 2 teacher
  vit(c, STUDENT)
  if teacher == "vit":
    vit(c.teacher.job, TEACHER)
  return c


def methods(weights: dict, **ot_layers) -> dict:
  """student, kd, ot, its controls and ot_kd with ``weights``;
  ``ot_layers``: the Omega_P term's student_layers / teacher_layers."""
  kd = common.with_term("kd", weights["kd"])
  ot = common.with_term("ot", weights["ot"], **ot_layers)
  return common.with_ot_controls({
      "student": common.unchanged,  # CE and weight decay only.
      "kd": kd, "ot": ot, "ot_kd": common.combine(ot, kd)})


def _arg(arg) -> tuple[str, str, bool]:
  a = common.parse_arg(arg, teacher="vit", method="", smoke="False")
  if a["teacher"] not in TEACHERS:
    raise ValueError(f"Unknown teacher={a['teacher']!r}; choose one of "
                     f"{TEACHERS} with --config=vit_distill.py:teacher=<name>.")
  return a["teacher"], a["method"], common.flag(a["smoke"])


def get_sweep(arg=None) -> dict:
  del arg  # The same grids for both teachers.
  return dict(SWEEP)


def get_methods(arg=None) -> dict:
  """``{method: Method}`` of ``arg``'s teacher, student (the baseline) first."""
  teacher = _arg(arg)[0]
  return methods(WEIGHTS[teacher], **OT_LAYERS[teacher])


def get_config(arg=None):
  """``arg``: ``teacher=vit|small_cnn,method=<method>,smoke=False`` (or a
  method)."""
  teacher, method, smoke = _arg(arg)
  c = experiment(teacher)
  if smoke:
    common.shrink(c, *common.SMOKE[DATA])
  return common.select_method(c, get_methods(arg), method)
