"""Alias of ``transfer.py:data=digits``, kept for the old command lines.

experiments/configs/transfer.py has the protocol, the methods and their
weights, and the launch commands:
  --config experiments/configs/digits_transfer.py:ot
is
  --config experiments/configs/transfer.py:data=digits,method=ot
(the same config, byte for byte).
"""

from experiments.configs import common, transfer

get_config, get_sweep = common.alias(transfer, "digits")
