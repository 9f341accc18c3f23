"""Alias of ``distill.py:data=fashion_mnist``, kept for the old command lines.

experiments/configs/distill.py has the protocol, the methods and their
weights, and the launch commands:
  --config experiments/configs/fashion_mnist_distill.py:ot
is
  --config experiments/configs/distill.py:data=fashion_mnist,method=ot
(the same config, byte for byte).
"""

from experiments.configs import common, distill

get_config, get_sweep = common.alias(distill, "fashion_mnist")
