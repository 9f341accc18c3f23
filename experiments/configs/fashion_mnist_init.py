"""Initialisation: the transfer student from random weights vs from the teacher's, with each term.

``transfer.py:data=fashion_mnist``'s teacher, student architecture, data
(K = 10 images per class of classes 5-9, full batch) and schedule; every run has weight
decay 5e-4 (body and head), so that a method differs from ``none`` by its
term alone and ``init_from_teacher`` (the swept key) changes the
initialisation alone (with the teacher's BatchNorm statistics frozen, as in
transfer: ``model.freeze_batchnorm`` follows ``init_from_teacher``):

  none              no term
  feature_matching  Omega_I on stage1-3 (neuron i to neuron i)
  ot                Omega_P on stage1-3 (neurons matched by transport)

Each run records the matched fraction per layer after training (the trace of
the OT plan between the student's and the teacher's layer on validation
images): how much of the plan is the identity.

The study (docs/regimes/initialisation; weights chosen per initialisation on
the tuning seed's validation split):
  python -m experiments.curve \
      --config experiments/configs/fashion_mnist_init.py \
      --key init_from_teacher --values False,True --seeds 5 --tuning_seeds 100 \
      --out docs/regimes/initialisation \
      --workdir workdirs/regimes/initialisation \
      --config.teacher.workdir=workdirs/regimes/teacher
"""

from experiments.configs import common, transfer

LAYERS = common.LAYERS

SWEEP = {m: transfer.SWEEP["fashion_mnist"][m]
         for m in ("feature_matching", "ot")}


def experiment():
  c = transfer.experiment("fashion_mnist")
  c.loss.weight_decay = 5e-4
  c.loss.head_decay = 5e-4
  c.init_from_teacher = False
  c.model.freeze_batchnorm = c.get_ref("init_from_teacher")
  return c


METHODS = {
    "none": common.unchanged,
    "feature_matching": common.with_term("feature_matching", 0.01,
                                         student_layers=LAYERS),
    "ot": common.with_term("ot", 0.01, student_layers=LAYERS),
}


def get_config(method=None):
  return common.select_method(experiment(), METHODS, method)
