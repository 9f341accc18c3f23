"""Fast stand-ins for ``model.init`` shared by the model and feature tests."""

import jax
import jax.numpy as jnp
import numpy as np


def abstract_variables(model, shape):
  """Variables as ShapeDtypeStructs: no FLOPs, so even ResNet-101 is instant."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def random_variables(model, shape, seed=0):
  """He-normal kernels, zero biases, identity BatchNorm, drawn by numpy.

  Stands in for ``model.init``, whose random initialisers take seconds per
  model to compile on CPU.
  """
  rng = np.random.default_rng(seed)

  def init(path, leaf):
    name = path[-1].key
    if name == "kernel":
      std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)
    fill = 1.0 if name in ("scale", "var") else 0.0
    return jnp.full(leaf.shape, fill, jnp.float32)

  abstract = abstract_variables(model, shape)
  return jax.tree_util.tree_map_with_path(init, abstract)
