"""The first-protocol regime studies of docs/regimes; the study is an argument.

Three curves of ``experiments.curve`` on Fashion-MNIST, each with
``transfer.py:data=fashion_mnist``'s teacher (small_cnn on classes 0-4),
student architecture, data (classes 5-9, K = 10 images per class, full
batch, 150 steps) and schedule. They were made under the first protocol
(weights on one tuning seed, 5 seeds, evaluation every 25 steps, the
student's own normalisation, teacher seed 0, and in data_scarcity the decays
of each method); regimes.py holds the current one, which transfer.py has
since moved to. This file pins what the first protocol built (:func:`first`,
:data:`FIRST_WEIGHTS`), so that its records stay what they were and a rerun
of these commands trains nothing:

  study=initialisation  the student from random weights vs from the
      teacher's (``init_from_teacher``, the swept key; the teacher's
      BatchNorm statistics frozen where it starts from the teacher:
      ``model.freeze_batchnorm`` follows ``init_from_teacher``), weight decay
      5e-4 (body and head) for every method, so that a method differs from
      ``none`` by its term alone:

        none              no term
        feature_matching  Omega_I on stage1-3 (neuron i to neuron i)
        ot                Omega_P on stage1-3 (neurons matched by transport)

      Each run records the matched fraction per layer after training (the
      trace of the OT plan between the student's and the teacher's layer on
      validation images): how much of the plan is the identity.
    python -m experiments.curve \
        --config experiments/configs/first_regimes.py:study=initialisation \
        --key init_from_teacher --values False,True --seeds 5 --tuning_seeds 100 \
        --out docs/regimes/initialisation \
        --workdir workdirs/regimes/initialisation \
        --config.teacher.workdir=workdirs/regimes/teacher

  study=data_scarcity  K = 2 .. 50 training images per class, the methods
      and weight grids transfer.py had then (initialised from the teacher
      but ``scratch``; not Omega_P's controls, which came later), each with
      its own decays: ``scratch`` and ``finetune_l2`` weight decay (the
      latter's tuned weight) and head decay 5e-4, the others no weight
      decay and head decay 0.01 (:data:`FIRST_TRANSFER`); every step a full
      batch at any K: ``batch_size`` = 5 classes x
      ``data.samples_per_class`` (a reference, so
      ``--config.data.samples_per_class`` moves it too). The validation split
      stays 50 images per class.
    python -m experiments.curve \
        --config experiments/configs/first_regimes.py:study=data_scarcity \
        --key data.samples_per_class --values 2,5,10,20,50 --seeds 5 --tuning_seeds 100 \
        --out docs/regimes/data_scarcity \
        --workdir workdirs/regimes/data_scarcity \
        --config.teacher.workdir=workdirs/regimes/teacher

  study=student_size  a small_cnn student of width ``model.kwargs.width``
      (0.25 .. 2 x the teacher's: stages of 16w / 32w / 64w channels) from
      random initialisation, weight decay 5e-4 (body and head), so that only
      the term differs between methods:

        scratch           no term
        attention         attention transfer on stage1-3
        fitnets           FitNets hint on stage2 (learned 1x1 regressor)
        feature_matching  Omega_I on stage1-3: only where the student's width
                          equals the teacher's (``applies``): index matching
                          needs as many neurons
        ot                Omega_P on stage1-3 (any widths)
    python -m experiments.curve \
        --config experiments/configs/first_regimes.py:study=student_size \
        --key model.kwargs.width --values 0.25,0.5,1.0,2.0 --seeds 5 --tuning_seeds 100 \
        --out docs/regimes/student_size \
        --workdir workdirs/regimes/student_size \
        --config.teacher.workdir=workdirs/regimes/teacher

Weights are chosen per value on the tuning seed's validation split.
"""

from experiments.configs import common, regimes, transfer

DATA = "fashion_mnist"
LAYERS = common.LAYERS
STUDIES = ("initialisation", "data_scarcity", "student_size")

# transfer.py's Fashion-MNIST weights of the first protocol (its sweep on
# tuning seed 100), which data_scarcity starts its grids from.
FIRST_WEIGHTS = {"finetune_l2": 5e-4, "l2_sp": 0.01, "delta": 0.01,
                 "feature_matching": 0.01, "ot": 0.01}


def _from_teacher(c):
  """transfer.py's start from the teacher then: head decay 0.01."""
  c.init_from_teacher = True
  c.model.freeze_batchnorm = True
  c.loss.head_decay = 0.01


def _decays(weight_decay: float, head_decay: float):
  def method(c):
    c.loss.weight_decay = weight_decay
    c.loss.head_decay = head_decay

  return method


# transfer.py's methods of the first protocol, each with its own decays (the
# current protocol gives every method one weight and one head decay).
FIRST_TRANSFER = {
    "scratch": _decays(5e-4, 5e-4),
    # The weight decay is the tuned weight (common.GRIDS["finetune_l2"]).
    "finetune_l2": common.combine(
        _from_teacher, _decays(FIRST_WEIGHTS["finetune_l2"], 5e-4)),
    "l2_sp": common.combine(_from_teacher, common.with_term(
        "l2_sp", FIRST_WEIGHTS["l2_sp"])),
    **{name: common.combine(_from_teacher, common.with_term(
        name, FIRST_WEIGHTS[name], student_layers=LAYERS))
       for name in ("delta", "feature_matching", "ot")},
}

# Each study's methods and weight grids (common.GRIDS).
METHODS = {
    "initialisation": {
        "none": common.unchanged,
        "feature_matching": common.with_term("feature_matching", 0.01,
                                             student_layers=LAYERS),
        "ot": common.with_term("ot", 0.01, student_layers=LAYERS),
    },
    "data_scarcity": FIRST_TRANSFER,
    "student_size": {
        "scratch": common.unchanged,
        "attention": common.with_term("attention", 100.0,
                                      student_layers=LAYERS),
        "fitnets": common.with_term("fitnets", 1.0,
                                    student_layers=("stage2",)),
        "feature_matching": common.with_term("feature_matching", 0.1,
                                             student_layers=LAYERS),
        "ot": common.with_term("ot", 0.1, student_layers=LAYERS),
    },
}
SWEEP = {
    "initialisation": common.grids("feature_matching", "ot"),
    "data_scarcity": common.grids(*FIRST_WEIGHTS),
    "student_size": common.grids("attention", "fitnets", "feature_matching",
                                 "ot"),
}


def first(c) -> None:
  """``c`` (transfer.py's Fashion-MNIST experiment) as the first protocol
  built it: its teacher trained with seed 0, the inputs normalised with the
  student's training set's statistics, and no decay (its methods or its
  study set them)."""
  c.teacher.job.seed = 0
  c.teacher_normalization = False
  c.loss.weight_decay = c.loss.head_decay = 0.0


def experiment(study: str):
  """What every method of ``study`` shares."""
  c = transfer.experiment(DATA)
  first(c)
  if study == "data_scarcity":
    # Full batch: every step sees each of the 5 classes' K images once.
    c.batch_size = c.data.get_ref("samples_per_class") * 5
    return c
  c.loss.weight_decay = 5e-4
  c.loss.head_decay = 5e-4
  if study == "initialisation":
    c.init_from_teacher = False
    c.model.freeze_batchnorm = c.get_ref("init_from_teacher")
  else:  # student_size
    c.model.kwargs = {"width": 1.0}
  return c


def _study(arg) -> tuple[str, str]:
  return common.study_arg(arg, STUDIES, "first_regimes.py")


def get_sweep(arg=None) -> dict:
  """``{method: (config key, grid)}`` of the study's methods with a term."""
  return dict(SWEEP[_study(arg)[0]])


def get_methods(arg=None) -> dict:
  """``{method: Method}`` of the study, its baseline (no term) first."""
  return dict(METHODS[_study(arg)[0]])


# Omega_I compares neuron i with neuron i: equal widths only (the trained
# teacher's width is in teacher.job.model.kwargs).
applies = regimes.applies


def get_config(arg=None):
  """``arg``: ``study=<name>,method=<method>`` (see the module docstring)."""
  study, method = _study(arg)
  return common.select_method(experiment(study), get_methods(arg), method)
