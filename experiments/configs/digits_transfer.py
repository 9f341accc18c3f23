"""Transfer learning, data-scarce: digits 0-4 teacher -> student on digits 5-9.

The teacher (digits_cnn) is trained on all training images of digits 0-4 and
cached in WORKDIR/teacher. A student of the same architecture learns digits
5-9 from `samples_per_class` images per class, validated on a disjoint
`val_per_class` carve-out and tested on the test split. Methods share data,
seeds and schedule:

  scratch           random init, weight decay
  finetune_l2       init from the teacher, weight decay (L2)
  l2_sp             init from the teacher, L2-SP (alpha=0.1, head beta=0.01)
  feature_matching  init from the teacher, Omega_I on stage1-3 (weight 0.1)
  ot                init from the teacher, Omega_P on stage1-3 (weight 0.1)

Students initialised from the teacher keep its BatchNorm statistics frozen
(model.freeze_batchnorm): with 25 training images, batch statistics are
noisy. This protocol (and lr 0.05, weight 0.1) came from a small exploratory
sweep; it is the same for every method, as is gradient clipping at norm 5
(without it, plain fine-tuning diverged on one seed of ten).

Launch one method (default: ot):
  python -m experiments.main \
      --config experiments/configs/digits_transfer.py:ot \
      --workdir workdirs/digits_transfer/ot
All methods x seeds, table and figures:
  python -m experiments.reproduce \
      --config experiments/configs/digits_transfer.py --seeds 3
"""

from experiments.configs import common

LAYERS = ("stage1", "stage2", "stage3")


def teacher_job():
  t = common.base_config()
  t.data.classes = (0, 1, 2, 3, 4)
  t.data.val_per_class = 10
  t.model.name = "digits_cnn"
  t.loss.weight_decay = 5e-4
  t.loss.head_decay = 5e-4
  t.num_steps = 300
  t.eval_every = 100
  # Digits steps take milliseconds: one device gives the README's numbers
  # bit for bit on any machine (more devices only change float rounding,
  # which 25-image training amplifies to a few test images).
  t.max_devices = 1
  return t


def experiment():
  """Everything the methods share."""
  c = common.base_config()
  c.data.classes = (5, 6, 7, 8, 9)
  c.data.samples_per_class = 5
  c.data.val_per_class = 20
  c.model.name = "digits_cnn"
  c.teacher.source = "train"
  c.teacher.name = "digits_cnn"
  c.teacher.job = teacher_job()
  c.analysis.layers = LAYERS
  c.batch_size = 25  # = 5 classes x 5 examples: one epoch per step.
  c.num_steps = 200
  c.eval_every = 20
  c.log_every = 20
  c.checkpoint_every = 100
  c.optimizer.learning_rate = 0.05
  c.optimizer.grad_clip_norm = 5.0
  c.method = "ot"
  c.baseline_method = "scratch"
  # Digits steps take milliseconds: one device gives the README's numbers
  # bit for bit on any machine (more devices only change float rounding,
  # which 25-image training amplifies to a few test images).
  c.max_devices = 1
  return c


def scratch(c):
  c.loss.weight_decay = 5e-4
  c.loss.head_decay = 5e-4


def from_teacher(c):
  c.init_from_teacher = True
  c.model.freeze_batchnorm = True


def finetune_l2(c):
  from_teacher(c)
  scratch(c)


def l2_sp(c):
  from_teacher(c)
  c.loss.terms.l2_sp = common.term("l2_sp", 0.1)
  c.loss.head_decay = 0.01


def feature_matching(c):
  from_teacher(c)
  c.loss.terms.feature_matching = common.term(
      "feature_matching", 0.1, student_layers=LAYERS)
  c.loss.head_decay = 0.01


def ot(c):
  from_teacher(c)
  c.loss.terms.ot = common.term("ot", 0.1, student_layers=LAYERS)
  c.loss.head_decay = 0.01


METHODS = {"scratch": scratch, "finetune_l2": finetune_l2, "l2_sp": l2_sp,
           "feature_matching": feature_matching, "ot": ot}


def get_config(method=None):
  return common.select_method(experiment(), METHODS, method)
