"""Alias of ``cross_arch.py:data=digits``, kept for the old command lines.

experiments/configs/cross_arch.py has the protocol, the methods and their
weights, and the launch commands:
  --config experiments/configs/digits_cross_arch.py:ot
is
  --config experiments/configs/cross_arch.py:data=digits,method=ot
(the same config, byte for byte).
"""

from experiments.configs import common, cross_arch

get_config, get_sweep = common.alias(cross_arch, "digits")
