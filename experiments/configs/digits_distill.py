"""Alias of ``distill.py:data=digits``, kept for the old command lines.

experiments/configs/distill.py has the protocol, the methods and their
weights, and the launch commands:
  --config experiments/configs/digits_distill.py:ot
is
  --config experiments/configs/distill.py:data=digits,method=ot
(the same config, byte for byte).
"""

from experiments.configs import common, distill

get_config, get_sweep = common.alias(distill, "digits")
