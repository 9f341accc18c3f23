"""The one source of defaults: every key a config may set, and method selection.

Every config starts from :func:`base_config`, changes what its experiment
needs, and returns :func:`select_method`'s locked result. A config's methods
(the variants ``experiments.reproduce`` compares) are functions that edit the
config. Every config file defines two functions of its argument:

* ``get_methods(arg=None) -> {method: Method}``: the suite, ``arg``'s methods
  in the order of the results; the first (the student without what the others
  add) is the baseline that reproduce compares them with. The tools read it
  through ``experiments.runs.load_config_module`` (``methods``,
  ``baseline``): the suite is the file's, never a key of a run's config.
* ``get_config(arg=None)``: one method's config,
  ``select_method(c, get_methods(arg), method)``.

The command line picks a method with ml_collections' ``file.py:ARG`` form
(``file.py:method``, or big_vision style ``key=value`` pairs for the
per-setting configs, :func:`parse_arg`) and its ``--config.key=value``
overrides are applied last, so they always win::

  python -m experiments.main \
      --config experiments/configs/transfer.py:data=digits,method=ot \
      --workdir W --config.loss.terms.ot.weight=0.5

One file per setting, its choices as arguments (big_vision style): transfer.py,
distill.py and cross_arch.py take the dataset (``data=digits|fashion_mnist``),
vit_distill.py the teacher, cifar100.py the network pair, imagenet_transfer.py
the dataset, regimes.py and first_regimes.py the study. Each method is written
once, with its weight per dataset; the weight grids the sweeps try are named
once (:data:`GRIDS`). The settings (not the regime studies) take
``smoke=True`` (big_vision's
``runlocal``): the same config, methods and code paths at a few steps and
tiny sizes (:func:`shrink`), what the end-to-end tests run::

  python -m experiments.main \
      --config experiments/configs/transfer.py:data=digits,smoke=True
"""

from typing import Callable, Mapping, Optional

import ml_collections

from experiments import data
from experiments.terms import term_config

Method = Callable[[ml_collections.ConfigDict], None]


def term(regularizer: str, weight: float, **kwargs) -> ml_collections.ConfigDict:
  """A ``loss.terms`` entry: see :func:`experiments.terms.term_config`."""
  return ml_collections.ConfigDict(
      term_config(regularizer, weight=weight, **kwargs))


def base_config() -> ml_collections.ConfigDict:
  """Every key a config may set, with its default (unlocked)."""
  c = ml_collections.ConfigDict()
  c.data = data.default_config()
  c.model = ml_collections.ConfigDict({
      # freeze_batchnorm: the student runs in inference mode (running BN
      # statistics, no dropout) while it trains.
      "name": "digits_cnn", "kwargs": {}, "freeze_batchnorm": False})
  c.teacher = ml_collections.ConfigDict({
      # 'none' | 'train' (c.teacher.job, cached in c.teacher.workdir, default
      # WORKDIR/teacher) | 'checkpoint' (c.teacher.path) | 'torchvision'
      # (c.teacher.name, weights file c.teacher.path) | 'random'. name,
      # kwargs: the network of a torchvision or random teacher only (a
      # trained one's is c.teacher.job.model; same_run.READ_ONLY_WHERE).
      "source": "none", "name": "digits_cnn", "kwargs": {},
      "path": "", "workdir": "", "job": {},
      # Only for source='random': the teacher's label space and input shape.
      "num_classes": 10, "image_shape": ()})
  # Start from the teacher's weights (same architecture), with a new head.
  c.init_from_teacher = False
  # With init_from_teacher: every layer's neurons permuted (a random,
  # function-preserving permutation drawn from the seed; sequential CNNs).
  c.init_permuted = False
  c.loss = ml_collections.ConfigDict({
      # name -> term(...): the teacher-based terms (Omega_P, Omega_I, KD, ...).
      "terms": {},
      "label_smoothing": 0.0,
      "weight_decay": 0.0,  # beta/2 ||theta_backbone||^2
      "head_decay": 0.0,  # beta/2 ||theta_head||^2
      # Stop after this many consecutive non-finite steps.
      "max_bad_steps": 20,
  })
  c.optimizer = ml_collections.ConfigDict({
      "name": "sgd", "learning_rate": 0.05, "momentum": 0.9,
      "schedule": "cosine",  # 'cosine' | 'step' | 'constant'
      "warmup_steps": 0, "step_boundaries": (0.5, 0.75), "step_factor": 0.1,
      "backbone_lr_multiplier": 1.0,
      "grad_clip_norm": 0.0})  # 0: no clipping
  c.batch_size = 64
  # Data-parallel width: at most this many devices (0: every device the
  # batch divides over). A fixed width gives bit-identical runs whatever the
  # machine's device count; more devices only change float rounding.
  c.max_devices = 0
  c.eval_batch_size = 256
  c.num_steps = 300
  c.log_every = 25
  c.eval_every = 50
  # False: the test split is evaluated only where a read needs it (a new best
  # validation accuracy, the last step), so that eval_every can be small.
  c.test_every_eval = True
  c.checkpoint_every = 100
  c.max_to_keep = 2
  c.augment = "none"  # 'none' | 'crop_flip' | 'imagenet'
  c.imagenet_normalization = False  # True for ImageNet-pretrained teachers
  # True: inputs are normalised with the teacher's statistics (those of the
  # data it was trained on, stored in its workdir), for the teacher's forward
  # pass and the student alike; False: with the student's training set's.
  c.teacher_normalization = False
  c.seed = 0
  # Resume a workdir whose checkpoint was written with other settings (data,
  # model, method, loss, ...): a new history section starts at the resumed
  # step. Without it such a resume is refused (see experiments/job.py).
  c.allow_resume_with_changes = False
  # experiments.reproduce sets data.seed = seed too (a new subsample per
  # seed); False keeps data.seed, e.g. when the teacher trained on the same
  # split, so that validation never holds teacher training images.
  c.vary_data_seed = True
  # OT between the trained student's and the teacher's layers on validation
  # images (paper Fig. 2); ot: solve_neuron_ot options (empty: its defaults).
  c.analysis = ml_collections.ConfigDict({
      "layers": (), "batch_size": 256, "ot": {}})
  # The method (experiment variant) this config describes (its file's
  # get_methods lists them all, in order; not a key of the run's config).
  c.method = ""
  return c


def select_method(config: ml_collections.ConfigDict,
                  methods: Mapping[str, Method],
                  method: Optional[str]) -> ml_collections.ConfigDict:
  """``config`` edited by ``methods[method]`` (default: ``config.method``), locked.

  Raises:
    ValueError: for a method the config does not define, listing them.
  """
  method = method or config.method
  if method not in methods:
    raise ValueError(
        f"Unknown method {method!r} for this config; choose one of "
        f"{tuple(methods)} with --config=<file>.py:<method>.")
  methods[method](config)
  config.method = method
  config.lock()
  return config


def with_term(regularizer: str, weight: float, **kwargs) -> Method:
  """A method that adds one term, named after its regulariser."""

  def method(c):
    c.loss.terms[regularizer] = term(regularizer, weight, **kwargs)

  return method


def combine(*methods: Method) -> Method:
  """A method that applies ``methods`` in order."""

  def method(c):
    for m in methods:
      m(c)

  return method


def unchanged(c) -> None:
  """The method that changes nothing (e.g. the plain student)."""
  del c


# The two controls of Omega_P (the ``ot`` term), each ``ot`` with these
# options: ``ot_uniform``, a relative epsilon so large that the plan is
# uniform (u v^T within 1e-3, tests/test_regimes.py): no neuron matching,
# only a pull on the layer's moments; ``ot_standardize``, transport between
# standardised neurons. Methods of every setting's config, beside ``ot``.
OT_CONTROLS = {"ot_uniform": {"relative_epsilon": 1e4},
               "ot_standardize": {"normalize": "standardize"}}


def contrasts(methods, baseline: str) -> list:
  """The pairs ``(focus, other)``, each read as ``focus - other`` seed by
  seed, that a settings table (experiments.reproduce) reports after method
  - baseline, in the order of ``methods`` (any iterable of method names):
  Omega_P (``ot``) against every other method but the baseline and
  ``ot_kd`` (against ``ot_uniform``: what transport matching adds beyond a
  pull on the layer's moments; against ``ot_standardize``: what
  standardising the neurons changes; against the other terms: what Omega_P
  adds over them), then Omega_P + KD against KD, where both are in
  ``methods``."""
  methods = list(methods)
  pairs = [("ot", m) for m in methods
           if "ot" in methods and m not in ("ot", "ot_kd", baseline)]
  return pairs + [("ot_kd", "kd")] * ({"ot_kd", "kd"} <= set(methods))


def with_options(method: Method, name: str, **options) -> Method:
  """``method``, then term ``name``'s options updated by ``options`` (its
  regulariser, weight and layers kept; an unknown option is refused)."""

  def edited(c):
    method(c)
    t = c.loss.terms[name]
    c.loss.terms[name] = term(
        t.regularizer, t.weight, student_layers=t.student_layers,
        teacher_layers=t.teacher_layers, layer_weights=t.layer_weights,
        **{**t.options, **options})

  return edited


def with_ot_controls(methods: Mapping[str, Method]) -> dict:
  """``methods`` with :data:`OT_CONTROLS` right after ``ot``: each is the
  ``ot`` method (its initialisation, weight and layers) with the control's
  options on its ``ot`` term."""
  out = {}
  for name, method in methods.items():
    out[name] = method
    if name == "ot":
      out.update({control: with_options(method, "ot", **options)
                  for control, options in OT_CONTROLS.items()})
  return out


# The stages every small-data config reads (digits_cnn, small_cnn, resnet8).
LAYERS = ("stage1", "stage2", "stage3")

# The protocol of docs/experiments.md ("The protocol"), shared by the
# settings and the regime studies. Teachers train with TEACHER_SEED, which no
# table seed (0 .. 9) or tuning seed (100, 101) is: a random-init student of
# the teacher's architecture never starts from the teacher's own initial
# weights (experiments.runs.check_initialisation refuses one that would).
TEACHER_SEED = 1000
# One weight decay and one head decay for every method of a table: methods
# differ by their term and their initialisation only.
DECAY = 5e-4

# The datasets of the per-setting configs, and the data-parallel width of
# each (config.max_devices). Digits steps take
# milliseconds: one device gives the documented numbers bit for bit on any
# machine (more devices only change float rounding, which 25-image training
# amplifies to a few test images). 0: every device the batch divides over.
MAX_DEVICES = {"digits": 1, "fashion_mnist": 0}


def parse_arg(arg: Optional[str], **defaults: str) -> dict:
  """The argument of ``--config=file.py:ARG``, big_vision style.

  ``ARG`` is ``key=value`` pairs joined by commas
  (``data=fashion_mnist,method=ot``); a bare word is the method
  (``file.py:ot`` is ``file.py:method=ot``). Returns ``defaults`` updated by
  ``ARG``; values stay strings.

  Raises:
    ValueError: for a key not in ``defaults``, naming the ones there are.
  """
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, eq, value = part.partition("=")
    if not eq:
      key, value = "method", part
    if key not in defaults:
      raise ValueError(
          f"Unknown config argument {key!r} in {arg!r}: this config takes "
          f"{', '.join(defaults)}, as --config=<file>.py:"
          f"{','.join(f'{k}=...' for k in defaults)}.")
    out[key] = value
  return out


def with_method(arg: Optional[str], method: Optional[str]) -> Optional[str]:
  """``arg`` (see :func:`parse_arg`) with the method set to ``method``, its
  other settings (``data=...``) kept: what reproduce and sweep pass to
  ``get_config`` for each method. ``arg`` itself when ``method`` is None."""
  if not method:
    return arg or None
  kept = [p for p in (arg or "").split(",")
          if "=" in p and not p.startswith("method=")]
  return ",".join([*kept, f"method={method}"]) if kept else method


# The student layers each representation term reads, per dataset (distill.py
# and cross_arch.py): FitNets' hint on stage2, Omega_P on every stage,
# attention transfer on stage1-2 of the 8x8 digits and on every stage of
# Fashion-MNIST.
TERM_LAYERS = {
    "digits": {"fitnets": ("stage2",), "attention": ("stage1", "stage2"),
               "ot": LAYERS},
    "fashion_mnist": {"fitnets": ("stage2",), "attention": LAYERS,
                      "ot": LAYERS},
}


def teacher_terms(plain: str, weights: Mapping[str, float],
                  data: str) -> dict:
  """``{method: Method}`` of a student trained without or with teacher-based
  terms: ``plain`` (CE and weight decay only), one method per regulariser in
  ``weights`` (at that weight, on ``TERM_LAYERS[data]``; none for logits),
  Omega_P's controls (:func:`with_ot_controls`, at ``ot``'s weight) and
  ``ot_kd`` (Omega_P + KD, each at its own weight) when both ``ot`` and
  ``kd`` are there. In that order."""
  layers = TERM_LAYERS[data]
  methods = {plain: unchanged, **{
      name: with_term(name, weight, **(
          {"student_layers": layers[name]} if name in layers else {}))
      for name, weight in weights.items()}}
  if "ot" in methods and "kd" in methods:
    methods["ot_kd"] = combine(methods["ot"], methods["kd"])
  return with_ot_controls(methods)


# The weight grids of the sweeps, named once: method -> (config key, grid),
# 0.1x / 1x / 10x a customary value. A config's SWEEP picks its methods'
# (:func:`grids`); regimes.py's studies extend some of them.
GRIDS = {
    "finetune_l2": ("loss.weight_decay", (5e-5, 5e-4, 5e-3)),
    "l2_sp": ("loss.terms.l2_sp.weight", (0.01, 0.1, 1.0)),
    "delta": ("loss.terms.delta.weight", (0.01, 0.1, 1.0)),
    "feature_matching": ("loss.terms.feature_matching.weight",
                         (0.01, 0.1, 1.0)),
    "ot": ("loss.terms.ot.weight", (0.01, 0.1, 1.0)),
    "kd": ("loss.terms.kd.weight", (0.1, 1.0, 10.0)),
    "fitnets": ("loss.terms.fitnets.weight", (0.1, 1.0, 10.0)),
    "attention": ("loss.terms.attention.weight", (10.0, 100.0, 1000.0)),
}


def grids(*methods: str) -> dict:
  """``{method: (config key, grid)}`` of :data:`GRIDS`, in this order."""
  return {m: GRIDS[m] for m in methods}


def sweeps(grids_of: Mapping[str, dict]) -> Callable:
  """``get_sweep(arg)`` of a per-setting config: the grids of ``arg``'s
  dataset in ``{data: {method: (config_key, values)}}`` ({} for none)."""

  def get_sweep(arg=None) -> dict:
    return dict(grids_of.get(setting_arg(arg)[0], {}))

  return get_sweep


def flag(value: str, name: str = "smoke") -> bool:
  """A boolean config argument (``smoke=True``): True/true/1 or
  False/false/0/empty.

  Raises:
    ValueError: for any other value, naming the ones accepted.
  """
  if value in ("True", "true", "1"):
    return True
  if value in ("False", "false", "0", ""):
    return False
  raise ValueError(f"Config argument {name}={value!r} is not a boolean: "
                   f"write {name}=True or {name}=False.")


def setting_arg(arg: Optional[str]) -> tuple[str, str, bool]:
  """``(data, method, smoke)`` of a per-setting config's argument
  (transfer.py, distill.py, cross_arch.py): ``data=digits`` by default, the
  config's default method (``""``), and ``smoke=False``.

  Raises:
    ValueError: for a dataset these configs do not define, listing them.
  """
  a = parse_arg(arg, data="digits", method="", smoke="False")
  if a["data"] not in MAX_DEVICES:
    raise ValueError(f"Unknown data={a['data']!r} for this config; choose "
                     f"one of {tuple(MAX_DEVICES)} with "
                     "--config=<file>.py:data=<name>.")
  return a["data"], a["method"], flag(a["smoke"])


def study_arg(arg: Optional[str], studies: tuple, file: str) -> tuple[str, str]:
  """``(study, method)`` of a study config's argument (``study=<name>``,
  default the first of ``studies``; ``method`` default ``""``).

  Raises:
    ValueError: for a study not in ``studies``, listing them.
  """
  a = parse_arg(arg, study=studies[0], method="")
  if a["study"] not in studies:
    raise ValueError(f"Unknown study={a['study']!r}; choose one of "
                     f"{studies} with --config={file}:study=<name>.")
  return a["study"], a["method"]


# smoke=True sizes of the small-data settings, per dataset: (the run's, its
# teacher job's), config key -> value. Digits: the end-to-end tests' job (20
# steps, an evaluation and a checkpoint every 10, resumable at 10; a 40-step
# teacher). Fashion-MNIST: 2 steps of batch 8 on a few images per class (the
# tests' IDX files hold 12 training images per class): 2 kept for validation
# per class and, where the setting draws K per class, K = 3.
_FASHION_MNIST_SMOKE = {
    "num_steps": 2, "batch_size": 8, "eval_batch_size": 16, "log_every": 2,
    "eval_every": 2, "checkpoint_every": 2, "data.val_per_class": 2,
    "data.samples_per_class": 3, "analysis.batch_size": 8}
SMOKE = {
    "digits": ({"num_steps": 20, "eval_every": 10, "log_every": 5,
                "checkpoint_every": 10}, {"num_steps": 40}),
    "fashion_mnist": (_FASHION_MNIST_SMOKE, _FASHION_MNIST_SMOKE),
}


def shrink(config: ml_collections.ConfigDict, sizes: Mapping[str, object],
           teacher_sizes: Mapping[str, object] = None) -> None:
  """``smoke=True``: ``config`` (unlocked) and, if it trains a teacher, its
  ``teacher.job`` set to ``sizes`` and ``teacher_sizes`` (dotted keys). A
  ``data.samples_per_class`` of None (every image) stays None: smoke shrinks
  sizes, never the kind of data."""
  jobs = [(config, sizes)]
  if config.teacher.source == "train" and teacher_sizes:
    jobs.append((config.teacher.job, teacher_sizes))
  for job, values in jobs:
    for key, value in values.items():
      *parents, leaf = key.split(".")
      node = job
      for part in parents:
        node = node[part]
      if leaf == "samples_per_class" and node[leaf] is None:
        continue
      node[leaf] = value
