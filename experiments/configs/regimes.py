"""The regime studies of docs/regimes under one protocol: when does Omega_P help?

One config for the studies; the study is an argument
(``regimes.py:study=<name>``). Every study is a curve of
``experiments.curve`` over one key, on Fashion-MNIST (offline IDX files), with
the protocol of docs/experiments.md ("Regime studies"):

* every method of a study has the same weight decay and head decay
  (common.DECAY, 5e-4): methods differ by their term and their
  initialisation only;
* the inputs of teacher and student are normalised with the teacher's
  statistics (``teacher_normalization``, stored with the teacher);
* the teachers train with seed common.TEACHER_SEED (1000), so that no table
  or tuning seed initialises a random-init student with its teacher's
  initial weights;
* evaluation every 5 steps (the test split only where a read needs it), so
  that the best-validation step is rarely the first evaluation;
* weights chosen on the mean validation accuracy of tuning seeds 100 and 101,
  10 table seeds, both reads (curve's defaults and ``--seeds 10``).

The first three are the settings' configs' too (transfer.py, distill.py,
cross_arch.py, which the studies build on); the rest are this file's.

Two controls of Omega_P (their options are common.OT_CONTROLS, as in every
setting's config; here each has its own weight grid): ot_uniform beside
``ot`` in every study (in distill, ot_uniform + KD beside Omega_P + KD),
ot_standardize in cross_arch, whose question it answers:

  ot_uniform      Omega_P with relative_epsilon 1e4: the plan is u v^T
                  (within 1e-3), no neuron matching, only a pull of every
                  student neuron towards the teacher layer's mean neuron --
                  a gain of ``ot`` counts as transport *matching* only where
                  ot beats ot_uniform by more than 2 s.e.
  ot_standardize  Omega_P on standardised neurons (normalize="standardize"):
                  matching blind to each neuron's scale and offset

The studies (commands run from the repository root; each writes
docs/regimes/<study>, trains only what is missing, and a rerun trains
nothing):

  permutation   the student starts from the teacher's weights with every
                layer's neurons permuted (function-preserving: the same
                network, other indices), against the unpermuted start; K = 10
    python -m experiments.curve \
        --config experiments/configs/regimes.py:study=permutation \
        --key init_permuted --values False,True --seeds 10 \
        --out docs/regimes/permutation --workdir workdirs/regimes/permutation
                then the table seeds as one block at every weight of
                each grid, and no term (resumes from the records above)
    python -m experiments.curve \
        --config experiments/configs/regimes.py:study=permutation \
        --key init_permuted --values False,True --seeds 10 --every_weight \
        --out docs/regimes/permutation --workdir workdirs/regimes/permutation
  cross_arch    resnet8 teacher (classes 0-4) -> small_cnn width 0.5 from
                random weights (classes 5-9), K in {2, 10}
    python -m experiments.curve \
        --config experiments/configs/regimes.py:study=cross_arch \
        --key data.samples_per_class --values 2,10 --seeds 10 \
        --out docs/regimes/cross_arch --workdir workdirs/regimes/cross_arch
  width         small_cnn teacher -> small_cnn of width 0.25 or 1 from
                random weights, K = 10 (Omega_I where the widths are equal)
    python -m experiments.curve \
        --config experiments/configs/regimes.py:study=width \
        --key model.kwargs.width --values 1.0,0.25 --seeds 10 \
        --out docs/regimes/width --workdir workdirs/regimes/width
  scarcity      from the teacher's weights, K in {2, 5}
    python -m experiments.curve \
        --config experiments/configs/regimes.py:study=scarcity \
        --key data.samples_per_class --values 2,5 --seeds 10 \
        --out docs/regimes/scarcity --workdir workdirs/regimes/scarcity
  distill       distillation to a smaller student on all ten classes:
                small_cnn width 2 -> width 0.5 (distill.py's pair); the
                teacher trained 6,000 steps of 128 (distill.py's 800 left it
                no better than the student), the student 2,000 (4.4 epochs;
                the first protocol's 300 left the best step at the last in
                28 of 30 runs); student, KD, Omega_P, Omega_P + KD,
                ot_uniform + KD (KD in the combinations at the weight this
                study chose for KD alone: get_inherited)
    python -m experiments.curve \
        --config experiments/configs/regimes.py:study=distill \
        --key num_steps --values 2000 --seeds 10 --focus ot_kd,ot,kd \
        --out docs/regimes/distill --workdir workdirs/regimes/distill

Teachers are committed with the records, in docs/regimes/teachers/<name>
(the last checkpoint and its metrics, under 1 MB each): a study resumed in
any session, on any machine, reads the very weights its records read,
where a retrained teacher could differ by float rounding (docs/regimes). The
small_cnn teacher (600 steps on classes 0-4; shared by permutation, width and
scarcity) is in teachers/small_cnn, distill's (width 2, all classes) in
teachers/small_cnn_width2_6000; the resnet8 one (cross_arch) would train into
teachers/resnet8. A teacher trained there keeps two checkpoints: commit the
last (the one the runs read). Two commands must not train the same teacher
at once.
"""

from experiments.configs import common, distill, transfer

LAYERS = common.LAYERS
DATA = "fashion_mnist"
TEACHER_STEPS = 6000  # The distill study's teacher (_distillation).
TEACHER_WORKDIR = "docs/regimes/teachers/{}"  # Committed: see above.
STUDIES = ("permutation", "cross_arch", "width", "scarcity", "distill")

# Grids (0.01 .. 10 for the feature terms: where a pull starts to hurt is
# part of the answer); curve extends a grid whose best is at an edge.
TERM_GRID = (0.01, 0.1, 1.0, 10.0)
GRIDS = {
    "feature_matching": TERM_GRID, "ot": TERM_GRID, "ot_uniform": TERM_GRID,
    "ot_standardize": TERM_GRID, "delta": TERM_GRID,
    # The settings' grids (common.GRIDS).
    **{m: common.GRIDS[m][1] for m in ("l2_sp", "attention", "fitnets")},
    "kd": (1.0, 10.0, 100.0), "ot_kd": (0.01, 0.1, 1.0),
    "ot_uniform_kd": (0.01, 0.1, 1.0),
}
# The config key each grid sets: the term a method adds.
TERM_OF = {"ot_uniform": "ot", "ot_standardize": "ot", "ot_kd": "ot",
           "ot_uniform_kd": "ot"}


def _teacher(model: str):
  t = transfer.teacher_job(DATA)  # Seed common.TEACHER_SEED.
  t.model.name = model
  return t


def _distillation():
  """distill.py's Fashion-MNIST pair, trained past its best step."""
  c = distill.experiment(DATA)  # Teacher seed and normalisation: common's.
  # distill.py's 800-step teacher (1.9 epochs) reached 87.4 % test accuracy,
  # no better than its 15x smaller student at 2,000 steps (87.1 %): there was
  # nothing to distil. 6,000 steps (13 epochs, cosine schedule).
  c.teacher.job.num_steps = TEACHER_STEPS
  c.teacher.job.eval_every = 500
  c.teacher.job.checkpoint_every = 1000
  c.teacher.workdir = TEACHER_WORKDIR.format(
      f"small_cnn_width2_{TEACHER_STEPS}")
  c.num_steps = 2000
  c.eval_every = 50
  c.log_every = 100
  c.checkpoint_every = 500
  c.test_every_eval = False
  c.analysis.layers = LAYERS
  return c


def experiment(study: str):
  """What every method of ``study`` shares."""
  if study == "distill":
    return _distillation()
  # Decays, teacher seed and normalisation: the settings' (common's).
  c = transfer.experiment(DATA)
  c.eval_every = 5
  c.test_every_eval = False
  c.batch_size = c.data.get_ref("samples_per_class") * 5  # Full batch.
  teacher = "resnet8" if study == "cross_arch" else "small_cnn"
  c.teacher.job = _teacher(teacher)
  c.teacher.workdir = TEACHER_WORKDIR.format(teacher)
  if study == "cross_arch":
    c.model.kwargs = {"width": 0.5}
  if study == "width":
    c.model.kwargs = {"width": 1.0}
  if study in ("permutation", "scarcity"):
    c.init_from_teacher = True
    # Few images: the teacher's BatchNorm statistics, not the batch's.
    c.model.freeze_batchnorm = True
  return c


def _term(name: str, **options):
  # The weight is the grid's middle point until curve sets the chosen one.
  weight = GRIDS[name][len(GRIDS[name]) // 2] if name in GRIDS else 1.0
  if name == "kd":  # Reads logits: no layers.
    return common.with_term("kd", weight)
  return common.with_term("ot" if name.startswith("ot") else name, weight,
                          student_layers=("stage2",) if name == "fitnets"
                          else LAYERS, **options)


TERMS = {
    "feature_matching": _term("feature_matching"),
    "delta": _term("delta"),
    "attention": _term("attention"),
    "fitnets": _term("fitnets"),
    "ot": _term("ot"),
    # The controls' options: common.OT_CONTROLS (the settings' too).
    **{m: _term(m, **options) for m, options in common.OT_CONTROLS.items()},
    "kd": _term("kd"),
}
# KD's weight in these two: get_inherited.
TERMS["ot_kd"] = common.combine(TERMS["ot"], TERMS["kd"])
TERMS["ot_uniform_kd"] = common.combine(TERMS["ot_uniform"], TERMS["kd"])


def _l2_sp(c):
  c.loss.terms.l2_sp = common.term("l2_sp", 0.1)


METHODS = {
    "permutation": {"none": common.unchanged,
                    **{m: TERMS[m] for m in ("feature_matching", "ot",
                                             "ot_uniform")}},
    "cross_arch": {"scratch": common.unchanged,
                   **{m: TERMS[m] for m in ("attention", "fitnets", "ot",
                                            "ot_uniform", "ot_standardize")}},
    "width": {"scratch": common.unchanged,
              **{m: TERMS[m] for m in ("attention", "fitnets",
                                       "feature_matching", "ot",
                                       "ot_uniform")}},
    "scarcity": {"finetune": common.unchanged, "l2_sp": _l2_sp,
                 **{m: TERMS[m] for m in ("delta", "feature_matching", "ot",
                                          "ot_uniform")}},
    "distill": {"student": common.unchanged,
                **{m: TERMS[m] for m in ("kd", "ot", "ot_kd",
                                         "ot_uniform_kd")}},
}


def _study(arg) -> tuple[str, str]:
  return common.study_arg(arg, STUDIES, "regimes.py")


def get_sweep(arg=None) -> dict:
  """``{method: (config key, grid)}`` of the study's methods with a term."""
  study, _ = _study(arg)
  return {m: (f"loss.terms.{TERM_OF.get(m, m)}.weight", GRIDS[m])
          for m in METHODS[study] if m in GRIDS}


def get_methods(arg=None) -> dict:
  """``{method: Method}`` of the study, its baseline (no term) first."""
  return dict(METHODS[_study(arg)[0]])


def get_inherited(arg=None) -> dict:
  """KD in Omega_P + KD and ot_uniform + KD at the weight the study chose for
  KD alone: a combination is read against the best KD."""
  if _study(arg)[0] != "distill":
    return {}
  return {m: {"loss.terms.kd.weight": "kd"}
          for m in ("ot_kd", "ot_uniform_kd")}


def applies(method, config) -> bool:
  """Omega_I compares neuron i with neuron i: equal widths only."""
  width = dict(config.model.kwargs).get("width", 1.0)
  teacher = dict(config.teacher.job.model.kwargs).get("width", 1.0)
  return method != "feature_matching" or width == teacher


def get_config(arg=None):
  """``arg``: ``study=<name>,method=<method>`` (see the module docstring)."""
  study, method = _study(arg)
  c = experiment(study)
  c.method = next(iter(METHODS[study]))
  return common.select_method(c, get_methods(arg), method)
