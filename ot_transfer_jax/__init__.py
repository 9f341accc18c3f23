"""ot_transfer_jax: representation transfer by optimal transport, in JAX.

The regulariser and its baselines are pure functions of activations::

    from ot_transfer_jax import ot_regularizer
    omega = ot_regularizer(student_feats, teacher_feats)   # (m, [h, w,] n)
"""

from ot_transfer_jax.losses import (
    attention_transfer,
    delta,
    feature_matching,
    fitnets_hint,
    kd_loss,
    l2,
    l2_sp,
    ot_regularizer,
)
from ot_transfer_jax.ot import (
    DEFAULT_RELATIVE_EPSILON,
    NeuronTransport,
    cost_matrix,
    neuron_descriptors,
    solve_neuron_ot,
)

__version__ = "0.2.0"

__all__ = [
    "DEFAULT_RELATIVE_EPSILON",
    "NeuronTransport",
    "attention_transfer",
    "cost_matrix",
    "delta",
    "feature_matching",
    "fitnets_hint",
    "kd_loss",
    "l2",
    "l2_sp",
    "neuron_descriptors",
    "ot_regularizer",
    "solve_neuron_ot",
]
