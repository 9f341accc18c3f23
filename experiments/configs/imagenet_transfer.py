"""Transfer: an ImageNet ResNet -> a fine-grained dataset, data-scarce; the dataset is an argument.

Protocol and methods: `paper.imagenet_transfer` (L2-SP's reference protocol,
9000 steps per data fraction; the student starts from the teacher with a new
head; Omega_I and Omega_P on stage1-4):

  data=cub200         ImageNet resnet50 -> CUB-200-2011 (TFDS
                      'caltech_birds2011', 200 classes). Reference
                      (Transfer-Learning-Library, ResNet-50): fine-tuning
                      81.8, DELTA 82.3 with all data; 51.2 and 54.8 with 15 %.
  data=stanford_dogs  ImageNet resnet101 -> Stanford Dogs (TFDS
                      'stanford_dogs', 120 classes), ResNet-101 as in L2-SP's
                      protocol. Caveat: Stanford Dogs' images come from
                      ImageNet, so its test images may be in the teacher's
                      training set (as in every published result on this
                      pair).

The teacher: torchvision's ImageNet ResNet saved as safetensors. On a machine
with internet (resnet101 for stanford_dogs):
  mkdir -p pretrained && python -c "import torch, torchvision; from safetensors.torch import save_file; save_file(torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), 'pretrained/resnet50.safetensors')"
(or point --config.teacher.path at the file). Prepare the data once
(TensorFlow + network): `tfds build caltech_birds2011 --file_format=array_record`
(or `stanford_dogs`).

Launch one method:
  python -m experiments.main \
      --config experiments/configs/imagenet_transfer.py:data=cub200,method=ot \
      --workdir workdirs/cub200_resnet50/frac0.15/ot \
      --config.data.train_fraction=0.15
All methods x seeds for each data fraction (one workdir per fraction):
  for f in 0.15 0.3 0.5 1.0; do
    python -m experiments.reproduce \
        --config experiments/configs/imagenet_transfer.py:data=cub200 \
        --seeds 3 --workdir workdirs/cub200_resnet50/frac$f \
        --config.data.train_fraction=$f
  done
smoke=True (paper.smoke): one step of batch 4 on 64 px images, ResNets of
one block per stage, and the teacher at random initialisation (no weights
file needed).
"""

from experiments.configs import common, paper

# data -> (TFDS name, ImageNet ResNet).
DATASETS = {"cub200": ("caltech_birds2011", "resnet50"),
            "stanford_dogs": ("stanford_dogs", "resnet101")}


def _arg(arg) -> dict:
  a = common.parse_arg(arg, data="cub200", method="", smoke="False")
  if a["data"] not in DATASETS:
    raise ValueError(f"Unknown data={a['data']!r}; choose one of "
                     f"{tuple(DATASETS)} with "
                     "--config=imagenet_transfer.py:data=<name>.")
  return a


def get_methods(arg=None) -> dict:
  """``{method: Method}`` (the same for both datasets), finetune_l2 (the
  baseline) first."""
  _arg(arg)
  return paper.imagenet_methods()


def get_config(arg=None):
  """``arg``: ``data=cub200|stanford_dogs,method=<method>,smoke=False`` (or
  a method)."""
  a = _arg(arg)
  c = paper.imagenet_transfer(*DATASETS[a["data"]], train_fraction=1.0)
  if common.flag(a["smoke"]):
    paper.smoke(c)
  return common.select_method(c, get_methods(arg), a["method"])
