"""What the paper-scale configs share: CIFAR-100 distillation and ImageNet transfer.

Not a config itself (no ``get_config``): ``cifar100.py`` (the network pair as an
argument) and ``imagenet_transfer.py`` (the dataset as an argument) call
:func:`cifar100_distillation` and :func:`imagenet_transfer` with their
architectures, take their methods from :func:`cifar100_methods` and
:func:`imagenet_methods`, and call :func:`smoke` for ``smoke=True``.

Regulariser weights marked UNTUNED below are documented starting points, not
values from the paper (whose full text we do not have): sweep them on the
validation split, e.g. ``--config.loss.terms.ot.weight=0.1``.

Each builder returns ``(config, methods)`` for
:func:`experiments.configs.common.select_method`.
"""

import math

from experiments.configs import common

# ---------------------------------------------------------------------------
# CIFAR-100 distillation, RepDistiller's protocol (Tian et al. 2020).
# ---------------------------------------------------------------------------

CIFAR_LAYERS = ("stage1", "stage2", "stage3")
CIFAR100_TRAIN_PER_CLASS = 500
CIFAR100_CLASSES = 100
CIFAR_VAL_PER_CLASS = 50  # 5,000 validation images carved out of train: 45,000 left.
CIFAR_BATCH = 64
CIFAR_EPOCHS = 240
CIFAR_LR_DROP_EPOCHS = (150, 180, 210)
# Omega_P / Omega_I weight: UNTUNED starting value (both are mean squared
# differences of post-ReLU activations, O(1) per layer, summed over 3 layers).
CIFAR_OT_WEIGHT = 1.0
CIFAR_KD_WEIGHT = 1.0  # The kd term's weight: CE + w KD (RepDistiller: 0.1 CE + 0.9 KD).
FITNETS_WEIGHT = 100.0  # RepDistiller's beta for the hint (MSE).
FITNETS_LAYER = "stage3"  # The last stage. RepDistiller's hint_layer=2 is stage2.
AT_WEIGHT = 1000.0  # RepDistiller's beta for AT, on every stage.


def cifar_steps_per_epoch(val_per_class: int = CIFAR_VAL_PER_CLASS,
                          batch_size: int = CIFAR_BATCH) -> int:
  """Steps of one epoch over CIFAR-100's train split minus the validation carve-out."""
  n_train = CIFAR100_CLASSES * (CIFAR100_TRAIN_PER_CLASS - val_per_class)
  return math.ceil(n_train / batch_size)


def _cifar_protocol(model_name: str):
  """RepDistiller's training protocol for one network, CE only (no teacher)."""
  c = common.base_config()
  c.data.name = "cifar100"
  c.data.val_per_class = CIFAR_VAL_PER_CLASS
  c.model.name = model_name
  c.augment = "crop_flip"
  c.batch_size = CIFAR_BATCH
  epoch = cifar_steps_per_epoch()
  c.num_steps = CIFAR_EPOCHS * epoch  # 240 x 704 = 168,960 steps.
  c.log_every = 100
  c.eval_every = epoch
  c.checkpoint_every = 2 * epoch
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.schedule = "step"
  c.optimizer.step_boundaries = tuple(e / CIFAR_EPOCHS for e in CIFAR_LR_DROP_EPOCHS)
  c.optimizer.step_factor = 0.1
  # SGD weight decay 5e-4 on every parameter, as torch.optim.SGD(weight_decay=5e-4).
  c.loss.weight_decay = 5e-4
  c.loss.head_decay = 5e-4
  return c


def cifar100_distillation(teacher_name: str, student_name: str):
  """Teacher ``teacher_name`` (trained here with the same protocol) -> ``student_name``.

  RepDistiller's protocol (Tian et al., ICLR 2020): 240 epochs of SGD (momentum
  0.9, lr 0.05 divided by 10 at epochs 150, 180 and 210), weight decay 5e-4,
  batch 64, random crop (pad 4) + horizontal flip. 50 images per class are
  carved out of the training split for model selection (45,000 left, 704 steps
  per epoch, 168,960 steps); the test split gives the reported numbers, at the
  last step and at the best-validation step. Evaluation every epoch, a
  checkpoint every 2 epochs.

  The teacher is trained here, by the same protocol with CE only
  (`teacher.source='train'`, `teacher.job`), once, in `teacher.workdir`
  (`experiments.reproduce` uses WORKDIR/teacher; with `experiments.main` pass
  `--config.teacher.workdir` so that methods share it). To reuse a finished
  run instead: `--config.teacher.source=checkpoint
  --config.teacher.path=workdirs/.../teacher`.

  Methods (:func:`cifar100_methods`; CE is always there; RepDistiller's
  weights where it has them):
    student           CE only
    kd                + KD, T=4, weight 1 (ours is CE + w KD)
    fitnets           + hint on stage3 (1x1 regressor), weight 100
    attention         + AT on stage1-3, weight 1000
    feature_matching  + Omega_I on stage1-3 (equal widths), weight 1 (UNTUNED)
    ot                + Omega_P on stage1-3, spatial='flatten', weight 1 (UNTUNED)
    ot_uniform        ot with a uniform plan (relative_epsilon 1e4): no neuron
                      matching, only a pull on the layer's moments
    ot_standardize    ot on standardised neurons (normalize="standardize")
    ot_kd             ot + kd

  The two controls of Omega_P (common.OT_CONTROLS) run at ot's weight; the
  regime studies (regimes.py) tune them separately.

  ``feature_matching`` (Omega_I) needs equal widths per stage.
  """
  c = _cifar_protocol(student_name)
  c.teacher.source = "train"
  c.teacher.job = _cifar_protocol(teacher_name)
  c.vary_data_seed = False  # The teacher trained on this same split.
  c.analysis.layers = CIFAR_LAYERS
  c.method = "ot"
  return c


def cifar100_methods(*, feature_matching: bool = True) -> dict:
  """``{method: Method}`` of :func:`cifar100_distillation`, student (the
  baseline) first; without ``feature_matching`` (Omega_I) when the widths
  differ."""
  # Teacher and student have the same resolution at every stage: the
  # default spatial='flatten' applies.
  ot = common.with_term("ot", CIFAR_OT_WEIGHT, student_layers=CIFAR_LAYERS)
  kd = common.with_term("kd", CIFAR_KD_WEIGHT, temperature=4.0)
  methods = {
      "student": common.unchanged,
      "kd": kd,
      "fitnets": common.with_term("fitnets", FITNETS_WEIGHT,
                                  student_layers=(FITNETS_LAYER,)),
      "attention": common.with_term("attention", AT_WEIGHT,
                                    student_layers=CIFAR_LAYERS),
  }
  if feature_matching:
    methods["feature_matching"] = common.with_term(
        "feature_matching", CIFAR_OT_WEIGHT, student_layers=CIFAR_LAYERS)
  methods["ot"] = ot
  methods["ot_kd"] = common.combine(ot, kd)
  return common.with_ot_controls(methods)


# ---------------------------------------------------------------------------
# ImageNet ResNet -> fine-grained task, L2-SP's reference protocol.
# ---------------------------------------------------------------------------

IMAGENET_LAYERS = ("stage1", "stage2", "stage3", "stage4")
TRANSFER_STEPS = 9000
TRANSFER_LR_DROP = 5000
L2SP_ALPHA = 0.1
L2SP_BETA = 0.01  # Head decay, shared by every method with a new head.
# The plain-L2 baseline: weight decay 0.01 on every weight. UNTUNED.
FINETUNE_L2 = 0.01
# Omega_P / Omega_I weight on stage1..4: UNTUNED starting value.
TRANSFER_OT_WEIGHT = 1.0


def imagenet_transfer(dataset: str, model_name: str, *,
                      train_fraction: float = 1.0):
  """ImageNet ``model_name`` (torchvision weights) fine-tuned on TFDS ``dataset``.

  The student is the teacher's architecture with a new head; it
  starts from the teacher (`init_from_teacher`: everything but the head). L2-SP's
  reference protocol (Li, Grandvalet, Davoine 2018): SGD momentum 0.9, batch 64,
  lr 0.01 divided by 10 at iteration 5000 of 9000, 224 x 224 random resized crops
  + flips, ImageNet normalisation. 10 % of each class of the training split is
  held out for model selection (`data.val_fraction`); `data.train_fraction` of
  what is left is trained on (the protocol's 15 / 30 / 50 / 100 %); test = the
  TFDS test split. Every fraction runs 9000 steps. Methods
  (:func:`imagenet_methods`):

    finetune_l2       weight decay 0.01 on all weights (UNTUNED)
    l2_sp             alpha/2 ||theta - theta^0||^2, alpha=0.1; head beta=0.01
    feature_matching  Omega_I (DELTA without attention weights) on stage1-4,
                      weight 1 (UNTUNED); head beta=0.01
    ot                Omega_P on stage1-4, spatial='flatten', weight 1 (UNTUNED);
                      head beta=0.01
    ot_uniform        ot with a uniform plan (relative_epsilon 1e4): no neuron
                      matching, only a pull on the layer's moments
    ot_standardize    ot on standardised neurons (normalize="standardize")

  The two controls of Omega_P (common.OT_CONTROLS) run at ot's weight; the
  regime studies (regimes.py) tune them separately.

  stage1-4 are the outputs of torchvision's layer1..layer4 (56x56x256 ..
  7x7x2048 at 224 px).
  """
  c = common.base_config()
  c.data.name = dataset
  c.data.image_size = 224
  c.data.val_fraction = 0.1  # Model selection on 10 % of train; test = TFDS test.
  c.data.train_fraction = train_fraction
  c.model.name = model_name
  c.teacher.source = "torchvision"
  c.teacher.name = model_name
  c.teacher.path = f"pretrained/{model_name}.safetensors"
  c.init_from_teacher = True  # Everything but the head comes from the teacher.
  c.imagenet_normalization = True
  c.augment = "imagenet"
  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_steps = TRANSFER_STEPS
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.schedule = "step"
  c.optimizer.step_boundaries = (TRANSFER_LR_DROP / TRANSFER_STEPS,)
  c.optimizer.step_factor = 0.1
  c.optimizer.backbone_lr_multiplier = 1.0  # L2-SP: one learning rate.
  c.analysis.layers = IMAGENET_LAYERS
  c.analysis.batch_size = 128
  c.method = "ot"
  return c


def imagenet_methods() -> dict:
  """``{method: Method}`` of :func:`imagenet_transfer`, finetune_l2 (the
  baseline) first."""

  def head_decay(c):
    c.loss.head_decay = L2SP_BETA

  def finetune_l2(c):
    c.loss.weight_decay = FINETUNE_L2
    c.loss.head_decay = FINETUNE_L2

  # Same network: same resolutions, the default spatial='flatten' applies.
  return common.with_ot_controls({
      "finetune_l2": finetune_l2,
      "l2_sp": common.combine(head_decay,
                              common.with_term("l2_sp", L2SP_ALPHA)),
      "feature_matching": common.combine(head_decay, common.with_term(
          "feature_matching", TRANSFER_OT_WEIGHT,
          student_layers=IMAGENET_LAYERS)),
      "ot": common.combine(head_decay, common.with_term(
          "ot", TRANSFER_OT_WEIGHT, student_layers=IMAGENET_LAYERS)),
  })


# ---------------------------------------------------------------------------
# smoke=True: every code path of a config at sizes a CPU runs in seconds.
# ---------------------------------------------------------------------------

SMOKE = {"num_steps": 1, "batch_size": 4, "eval_batch_size": 8,
         "log_every": 1, "eval_every": 1, "checkpoint_every": 1,
         "analysis.batch_size": 4}
# ImageNet ResNets at 224 px compile and run slowly on CPU; 64 px keeps every
# stage (stage4 is 2 x 2) and every code path.
SMOKE_IMAGE_SIZE = 64
# ImageNet ResNets shrink to one block per stage: the same blocks and stage
# names (compiling ResNet-101's 33 blocks took 2-4 minutes of CPU).
SHALLOW = {"stage_sizes": (1, 1, 1, 1)}
IMAGENET_CLASSES = 1000


def smoke(c) -> None:
  """``c`` (a config of this module's builders, unlocked) at smoke sizes:
  one step of batch 4 for the student and a trained teacher, the analysis on
  the first layer only, 64 px images where the config resizes them, and an
  ImageNet-pretrained setting's ResNets of one block per stage, the teacher
  then at random initialisation (torchvision's weights have every block; no
  weights file is needed)."""
  common.shrink(c, SMOKE, SMOKE)
  c.analysis.layers = tuple(c.analysis.layers)[:1]
  if c.data.image_size is not None:
    c.data.image_size = SMOKE_IMAGE_SIZE
  if c.teacher.source == "torchvision":
    c.model.kwargs = dict(SHALLOW)
    c.teacher.source = "random"
    c.teacher.kwargs = dict(SHALLOW)
    c.teacher.num_classes = IMAGENET_CLASSES
    c.teacher.image_shape = (SMOKE_IMAGE_SIZE, SMOKE_IMAGE_SIZE, 3)
