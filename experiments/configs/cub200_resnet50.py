"""Transfer: ImageNet resnet50 -> CUB-200-2011 (TFDS 'caltech_birds2011'), data-scarce.

Protocol and methods: `paper.imagenet_transfer` (L2-SP's reference protocol,
9000 steps per data fraction; the student starts from the teacher with a new
200-way head; Omega_I and Omega_P on stage1-4). Reference
(Transfer-Learning-Library, ResNet-50): fine-tuning 81.8, DELTA 82.3 with all
data; 51.2 and 54.8 with 15 %.

The teacher: torchvision's ImageNet resnet50 saved as safetensors. On a machine
with internet:
  mkdir -p pretrained && python -c "import torch, torchvision; from safetensors.torch import save_file; save_file(torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), 'pretrained/resnet50.safetensors')"
(or point --config.teacher.path at the file). Prepare the data once
(TensorFlow + network): `tfds build caltech_birds2011 --file_format=array_record`.

Launch one method:
  python -m experiments.main --config experiments/configs/cub200_resnet50.py:ot \
      --workdir workdirs/cub200_resnet50/frac0.15/ot \
      --config.data.train_fraction=0.15
All methods x seeds for each data fraction (one workdir per fraction):
  for f in 0.15 0.3 0.5 1.0; do
    python -m experiments.reproduce --config experiments/configs/cub200_resnet50.py \
        --seeds 3 --workdir workdirs/cub200_resnet50/frac$f \
        --config.data.train_fraction=$f
  done
"""

from experiments.configs import common, paper


def get_config(method=None):
  return common.select_method(*paper.imagenet_transfer("caltech_birds2011", "resnet50", train_fraction=1.0), method)
