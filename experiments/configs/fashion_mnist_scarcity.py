"""Data scarcity: Fashion-MNIST transfer at K = 2 .. 50 training images per class.

``transfer.py:data=fashion_mnist``'s teacher (small_cnn on classes 0-4),
student (the same architecture on classes 5-9, initialised from the teacher
but for ``scratch``), methods, schedule (150 steps) and weight grids
(``SWEEP``), with every step a full batch at any K: ``batch_size`` = 5 classes x
``data.samples_per_class`` (a reference, so ``--config.data.samples_per_class``
moves it too). The validation split stays 50 images per class.

The study (docs/regimes/data_scarcity; weights chosen per K on the tuning
seed's validation split):
  python -m experiments.curve \
      --config experiments/configs/fashion_mnist_scarcity.py \
      --key data.samples_per_class --values 2,5,10,20,50 --seeds 5 --tuning_seeds 100 \
      --out docs/regimes/data_scarcity \
      --workdir workdirs/regimes/data_scarcity \
      --config.teacher.workdir=workdirs/regimes/teacher
"""

from experiments.configs import common, transfer

DATA = "fashion_mnist"
SWEEP = transfer.SWEEP[DATA]
METHODS = transfer.methods(DATA)


def experiment():
  c = transfer.experiment(DATA)
  # Full batch: every step sees each of the 5 classes' K images once.
  c.batch_size = c.data.get_ref("samples_per_class") * 5
  return c


def get_config(method=None):
  return common.select_method(experiment(), METHODS, method)
