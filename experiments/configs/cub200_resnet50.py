"""Transfer: ImageNet resnet50 -> CUB-200-2011 (TFDS 'caltech_birds2011'), data-scarce.

The student is the teacher's architecture with a new 200-way head; it
starts from the teacher (`init_from_teacher`: everything but the head). L2-SP's
reference protocol (Li, Grandvalet, Davoine 2018): SGD momentum 0.9, batch 64,
lr 0.01 divided by 10 at iteration 5000 of 9000, 224 x 224 random resized crops
+ flips, ImageNet normalisation. 10 % of each class of the training split is
held out for model selection (`data.val_fraction`); `data.train_fraction` of
what is left is trained on (the protocol's 15 / 30 / 50 / 100 %); test = the
TFDS test split. Every fraction runs 9000 steps.

  finetune_l2       weight decay 0.01 on all weights (UNTUNED)
  l2_sp             alpha/2 ||theta - theta^0||^2, alpha=0.1; head beta=0.01
  feature_matching  Omega_I (DELTA without attention weights) on stage1-4,
                    weight 1 (UNTUNED); head beta=0.01
  ot                Omega_P on stage1-4, spatial='flatten', weight 1 (UNTUNED);
                    head beta=0.01

stage1-4 are the outputs of torchvision's layer1..layer4 (56x56x256 ..
7x7x2048 at 224 px). Reference (Transfer-Learning-Library, ResNet-50): fine-tuning 81.8, DELTA
82.3 with all data; 51.2 and 54.8 with 15 %.

The teacher: torchvision's ImageNet resnet50 saved as safetensors. On a machine
with internet:
  mkdir -p pretrained && python -c "import torch, torchvision; from safetensors.torch import save_file; save_file(torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), 'pretrained/resnet50.safetensors')"
(or point --config.teacher.path at the file). Prepare the data once
(TensorFlow + network): `tfds build caltech_birds2011 --file_format=array_record`.

Launch one method:
  python -m experiments.main --config experiments/configs/cub200_resnet50.py \
      --workdir workdirs/cub200_resnet50/frac0.15/ot --config.method=ot \
      --config.data.train_fraction=0.15
All methods x seeds for each data fraction (one workdir per fraction):
  for f in 0.15 0.3 0.5 1.0; do
    python -m experiments.reproduce --config experiments/configs/cub200_resnet50.py \
        --seeds 3 --workdir workdirs/cub200_resnet50/frac$f \
        --config.data.train_fraction=$f
  done
"""

from experiments.configs import paper


def get_config():
  return paper.imagenet_transfer("caltech_birds2011", "resnet50", train_fraction=1.0)
