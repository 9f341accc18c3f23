"""The one source of defaults: every key a config may set, and method selection.

Every config starts from :func:`base_config`, changes what its experiment
needs, and returns :func:`select_method`'s locked result. A config's methods
(the variants ``experiments.reproduce`` compares) are functions that edit the
config; the command line picks one with ml_collections' ``file.py:method``
form and its ``--config.key=value`` overrides are applied last, so they always
win::

  python -m experiments.main --config experiments/configs/digits_transfer.py:ot \
      --workdir W --config.loss.terms.ot.weight=0.5
"""

from typing import Callable, Mapping, Optional

import ml_collections

from experiments import data
from ot_transfer_jax import regularizers

Method = Callable[[ml_collections.ConfigDict], None]


def term(regularizer: str, weight: float, **kwargs) -> ml_collections.ConfigDict:
  """A ``loss.terms`` entry: see :func:`ot_transfer_jax.regularizers.term_config`."""
  return ml_collections.ConfigDict(
      regularizers.term_config(regularizer, weight=weight, **kwargs))


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
  c.checkpoint_every = 100
  c.max_to_keep = 2
  c.augment = "none"  # 'none' | 'crop_flip' | 'imagenet'
  c.imagenet_normalization = False  # True for ImageNet-pretrained teachers
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
