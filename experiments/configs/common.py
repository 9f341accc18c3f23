"""The one source of defaults: every key a config may set, and method selection.

Every config starts from :func:`base_config`, changes what its experiment
needs, and returns :func:`select_method`'s locked result. A config's methods
(the variants ``experiments.reproduce`` compares) are functions that edit the
config; the command line picks one with ml_collections' ``file.py:ARG``
form (``file.py:method``, or big_vision style ``key=value`` pairs for the
per-setting configs, :func:`parse_arg`) and its ``--config.key=value``
overrides are applied last, so they always win::

  python -m experiments.main \
      --config experiments/configs/transfer.py:data=digits,method=ot \
      --workdir W --config.loss.terms.ot.weight=0.5

transfer.py, distill.py and cross_arch.py are one config per setting, with
the dataset as an argument; each method is written once, with its weight per
dataset. The digits_* and fashion_mnist_* files are aliases (:func:`alias`).
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
      # (c.teacher.name, weights file c.teacher.path) | 'random'.
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
  # The method (experiment variant) this config describes; its methods in
  # the order of the results, and the one reproduce compares them with.
  c.method = ""
  c.method_order = ()
  c.baseline_method = ""
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
  config.method_order = tuple(methods)
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


# The stages every small-data config reads (digits_cnn, small_cnn, resnet8).
LAYERS = ("stage1", "stage2", "stage3")

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
  and ``ot_kd`` (Omega_P + KD, each at its own weight) when both ``ot`` and
  ``kd`` are there. In that order."""
  layers = TERM_LAYERS[data]
  methods = {plain: unchanged, **{
      name: with_term(name, weight, **(
          {"student_layers": layers[name]} if name in layers else {}))
      for name, weight in weights.items()}}
  if "ot" in methods and "kd" in methods:
    methods["ot_kd"] = combine(methods["ot"], methods["kd"])
  return methods


def sweeps(grids: Mapping[str, dict]) -> Callable:
  """``get_sweep(arg)`` of a per-setting config: the grids of ``arg``'s
  dataset in ``{data: {method: (config_key, values)}}`` ({} for none)."""

  def get_sweep(arg=None) -> dict:
    return dict(grids.get(setting_arg(arg)[0], {}))

  return get_sweep


def setting_arg(arg: Optional[str]) -> tuple[str, str]:
  """``(data, method)`` of a per-setting config's argument (transfer.py,
  distill.py, cross_arch.py): ``data=digits`` by default, and the config's
  default method (``""``).

  Raises:
    ValueError: for a dataset these configs do not define, listing them.
  """
  a = parse_arg(arg, data="digits", method="")
  if a["data"] not in MAX_DEVICES:
    raise ValueError(f"Unknown data={a['data']!r} for this config; choose "
                     f"one of {tuple(MAX_DEVICES)} with "
                     "--config=<file>.py:data=<name>.")
  return a["data"], a["method"]


def alias(setting, data: str) -> tuple[Callable, Callable]:
  """``(get_config, get_sweep)`` of the per-setting config module
  ``setting`` with ``data`` fixed: the per-dataset files of the old command
  lines (``digits_transfer.py:ot`` is ``transfer.py:data=digits,method=ot``)."""

  def get_config(method=None):
    return setting.get_config(with_method(f"data={data}", method))

  def get_sweep(arg=None):
    del arg  # The dataset is fixed.
    return setting.get_sweep(f"data={data}")

  return get_config, get_sweep
