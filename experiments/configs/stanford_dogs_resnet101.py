"""Transfer: ImageNet resnet101 -> Stanford Dogs (TFDS 'stanford_dogs'), data-scarce.

Protocol and methods: `paper.imagenet_transfer` (L2-SP's reference protocol,
9000 steps per data fraction; the student starts from the teacher with a new
120-way head; Omega_I and Omega_P on stage1-4). ResNet-101 as in L2-SP's
protocol. Caveat: Stanford Dogs' images come from ImageNet, so its test images may be in the teacher's
training set (as in every published result on this pair).

The teacher: torchvision's ImageNet resnet101 saved as safetensors. On a machine
with internet:
  mkdir -p pretrained && python -c "import torch, torchvision; from safetensors.torch import save_file; save_file(torchvision.models.resnet101(weights='IMAGENET1K_V1').state_dict(), 'pretrained/resnet101.safetensors')"
(or point --config.teacher.path at the file). Prepare the data once
(TensorFlow + network): `tfds build stanford_dogs --file_format=array_record`.

Launch one method:
  python -m experiments.main --config experiments/configs/stanford_dogs_resnet101.py:ot \
      --workdir workdirs/stanford_dogs_resnet101/frac0.15/ot \
      --config.data.train_fraction=0.15
All methods x seeds for each data fraction (one workdir per fraction):
  for f in 0.15 0.3 0.5 1.0; do
    python -m experiments.reproduce --config experiments/configs/stanford_dogs_resnet101.py \
        --seeds 3 --workdir workdirs/stanford_dogs_resnet101/frac$f \
        --config.data.train_fraction=$f
  done
"""

from experiments.configs import common, paper


def get_config(method=None):
  return common.select_method(*paper.imagenet_transfer("stanford_dogs", "resnet101", train_fraction=1.0), method)
