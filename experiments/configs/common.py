"""Defaults shared by every experiment config; each config overrides them."""

import ml_collections

from ot_transfer_jax import data


def ot_options():
  """Options of ``solve_neuron_ot`` used by the OT regulariser and analysis."""
  return ml_collections.ConfigDict({
      "relative_epsilon": 0.01,
      "spatial": "flatten",
      "normalize": "none",
      "threshold": 1e-3,
      "max_iterations": 2000,
      "grad": "envelope",
      # Start Sinkhorn from the previous step's potentials.
      "warm_start": True,
  })


def base_config():
  """Every key a config may set, with its default."""
  c = ml_collections.ConfigDict()
  c.data = data.default_config()
  c.model = ml_collections.ConfigDict({
      # freeze_batchnorm: the student runs in inference mode (running BN
      # statistics, no dropout) while it trains.
      "name": "digits_cnn", "kwargs": {}, "freeze_batchnorm": False})
  c.teacher = ml_collections.ConfigDict({
      # 'none' | 'train' (c.teacher.job, cached) | 'checkpoint' | 'torchvision'
      "source": "none", "name": "digits_cnn", "kwargs": {},
      "path": "", "workdir": "", "job": {},
      # Only for source='random': the teacher's label space and input shape.
      "num_classes": 10, "image_shape": ()})
  c.init_from_teacher = False
  # Top-level modules that init_from_teacher leaves freshly initialised.
  c.transfer_reinit = ("head",)
  c.loss = ml_collections.ConfigDict({
      "method": "none",  # 'none' | 'ot' | 'feature_matching' | 'attention' | 'fitnets'
      "weight": 0.0,
      "student_layers": (),
      "teacher_layers": (),
      "layer_weights": (),
      "ot": ot_options(),
      "kd_weight": 0.0,
      "kd_temperature": 4.0,
      "label_smoothing": 0.0,
      "weight_decay": 0.0,  # beta/2 ||theta_backbone||^2
      "l2_sp": 0.0,  # alpha/2 ||theta_backbone - theta_teacher||^2
      "head_decay": 0.0,  # beta/2 ||theta_head||^2
      "max_bad_steps": 20,
  })
  c.optimizer = ml_collections.ConfigDict({
      "name": "sgd", "learning_rate": 0.05, "momentum": 0.9,
      "nesterov": False, "adamw_weight_decay": 0.0, "schedule": "cosine",
      "warmup_steps": 0, "step_boundaries": (0.5, 0.75), "step_factor": 0.1,
      "backbone_lr_multiplier": 1.0, "grad_clip_norm": 0.0})  # 0: no clip
  c.batch_size = 64
  c.eval_batch_size = 256
  c.num_steps = 300
  c.log_every = 25
  c.eval_every = 50
  c.checkpoint_every = 100
  c.max_to_keep = 2
  c.augment = "none"  # 'none' | 'crop_flip' | 'imagenet'
  c.imagenet_normalization = False  # True for ImageNet-pretrained teachers
  c.seed = 0
  # experiments.reproduce sets data.seed = seed too (a new subsample per
  # seed); False keeps data.seed, e.g. when the teacher trained on the same
  # split, so that validation never holds teacher training images.
  c.vary_data_seed = True
  c.analysis_layers = ()
  c.analysis_batch_size = 256
  # Methods compared by experiments.reproduce: name -> overrides merged into
  # this config. `method` picks the one `experiments.main` runs.
  c.method = ""
  c.methods = {}
  # The order of the methods in the results (ConfigDict sorts its keys).
  c.method_order = ()
  # reproduce compares every method with this one, seed by seed.
  c.baseline_method = ""
  return c
