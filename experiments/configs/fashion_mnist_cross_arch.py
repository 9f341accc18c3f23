"""Alias of ``cross_arch.py:data=fashion_mnist``, kept for the old command lines.

experiments/configs/cross_arch.py has the protocol, the methods and their
weights, and the launch commands:
  --config experiments/configs/fashion_mnist_cross_arch.py:ot
is
  --config experiments/configs/cross_arch.py:data=fashion_mnist,method=ot
(the same config, byte for byte).
"""

from experiments.configs import common, cross_arch

get_config, get_sweep = common.alias(cross_arch, "fashion_mnist")
