"""Alias of ``transfer.py:data=fashion_mnist``, kept for the old command lines.

experiments/configs/transfer.py has the protocol, the methods and their
weights, and the launch commands:
  --config experiments/configs/fashion_mnist_transfer.py:ot
is
  --config experiments/configs/transfer.py:data=fashion_mnist,method=ot
(the same config, byte for byte).
"""

from experiments.configs import common, transfer

get_config, get_sweep = common.alias(transfer, "fashion_mnist")
