"""Knowledge distillation between transformers: ViT width 32 -> width 16, Fashion-MNIST.

fashion_mnist_distill's protocol (data split, teacher schedule, 300 student
steps of batch 128, seeds) with ViTs instead of CNNs: 4 x 4 patches, so every
block holds 7 x 7 = 49 tokens. The teacher (vit width 32, depth 2, 19.6 k
parameters) is trained on all ten classes and cached in WORKDIR/teacher; the
student has half its width (vit width 16, depth 2, 5.7 k parameters). Omega_P
compares each block's residual stream, (batch, 49 tokens, 16) with (batch,
49, 32), tokens as positions (spatial="flatten"); the widths differ, so
Omega_I (feature matching) and DELTA do not apply:

  student    CE and weight decay only
  kd         CE + KD (T = 4)
  ot         CE + Omega_P on block0, block1 (residual streams)
  ot_kd      CE + Omega_P + KD, each weight as chosen for ot and kd alone

SGD as for the CNNs, with a 50-step warm-up and gradient clipping (norm 1),
which a transformer trained by SGD needs. Each weight is the best on the
validation split of tuning seed 100 out of 0.1x, 1x and 10x a customary value,
chosen by
  python -m experiments.sweep \
      --config experiments/configs/fashion_mnist_vit_distill.py --seed 100
(docs/fashion_mnist/fashion_mnist_vit_distill/sweep.md).

All methods x seeds, table and figures:
  python -m experiments.reproduce \
      --config experiments/configs/fashion_mnist_vit_distill.py --seeds 5
"""

from experiments.configs import common, distill

TEACHER = {"width": 32, "depth": 2}
STUDENT = {"width": 16, "depth": 2}
LAYERS = ("block0", "block1")

SWEEP = {
    "kd": ("loss.terms.kd.weight", (0.1, 1.0, 10.0)),
    "ot": ("loss.terms.ot.weight", (0.01, 0.1, 1.0)),
}
# Chosen by the sweep above (validation accuracy, seed 100; the sweep's
# records: docs/fashion_mnist/fashion_mnist_vit_distill/sweep.json).
WEIGHTS = {"kd": 0.1, "ot": 0.1}


def vit(c, kwargs):
  """``c`` trains a ViT: the model, and SGD with warm-up and clipping."""
  c.model.name = "vit"
  c.model.kwargs = dict(kwargs)
  c.optimizer.warmup_steps = 50
  c.optimizer.grad_clip_norm = 1.0


def teacher_job():
  t = distill.teacher_job("fashion_mnist")
  vit(t, TEACHER)
  return t


def experiment():
  c = distill.experiment("fashion_mnist")
  vit(c, STUDENT)
  c.teacher.name = "vit"
  c.teacher.job = teacher_job()
  return c


def methods(weights: dict, **ot_layers) -> dict:
  """student, kd, ot and ot_kd with ``weights``; ``ot_layers``: the Omega_P
  term's student_layers / teacher_layers."""
  kd = common.with_term("kd", weights["kd"])
  ot = common.with_term("ot", weights["ot"], **ot_layers)
  return {"student": common.unchanged,  # CE and weight decay only.
          "kd": kd, "ot": ot, "ot_kd": common.combine(ot, kd)}


METHODS = methods(WEIGHTS, student_layers=LAYERS)


def get_config(method=None):
  return common.select_method(experiment(), METHODS, method)
