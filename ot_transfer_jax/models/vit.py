"""A small Vision Transformer (pre-LayerNorm) whose token layers Omega_P can compare.

Patches become tokens, in row-major order of the patch grid, and every block
keeps that order, so a block's activations ``(N, tokens, width)`` are a layer
like a convolution's ``(N, h, w, channels)``: the tokens play the role of the
positions. On 28 x 28 inputs with ``patch_size=4`` the grid is 7 x 7 = 49
tokens, the grid of ``small_cnn``'s and ``resnet8``'s stage3, so
``spatial="flatten"`` compares a ViT block with those stages position by
position (``"pool"`` averages the tokens away, for any grids)::

  ViT   embed        conv(patch, stride patch) + position embedding
                                                  [N, h, w, width]
        block0       x + attn(LN(x)); x + mlp(LN(x))  [N, h*w, width]
        block0/hidden    the MLP's hidden units, GELU [N, h*w, mlp_ratio*width]
        ...          (``depth`` blocks)
        norm         final LayerNorm              [N, h*w, width]
        (mean over tokens)
        head                                      [N, num_classes]

No class token (it would be a position without a counterpart in a CNN), no
BatchNorm, no dropout: ``train`` changes nothing.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ot_transfer_jax.models.layers import classifier_head


class PatchEmbedding(nn.Module):
  """Linear patch embedding plus a learned position embedding.

  [N, H, W, C] -> [N, H / patch, W / patch, features].
  """

  features: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    p = self.patch_size
    x = nn.Conv(self.features, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, name="conv")(x.astype(self.dtype))
    return x + self.param("position", nn.initializers.normal(0.02),
                          (1, *x.shape[1:]))


class MlpHidden(nn.Module):
  """Dense-GELU: the MLP's hidden units, a capture point of their own.

  [N, T, D] -> [N, T, features].
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return nn.gelu(nn.Dense(self.features, dtype=self.dtype, name="dense")(x))


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: [N, T, D] -> [N, T, D] (the residual stream)."""

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    width = x.shape[-1]
    y = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, name="attn")(y, y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    y = MlpHidden(self.mlp_dim, self.dtype, name="hidden")(y)
    return x + nn.Dense(width, dtype=self.dtype, name="mlp_out")(y)


class ViT(nn.Module):
  """[N, H, W, C] (H, W divisible by ``patch_size``) -> [N, num_classes] logits.

  Attributes:
    num_classes: size of ``head``.
    width: the residual stream's width (tokens' neurons); a multiple of
      ``num_heads``.
    depth: number of blocks, ``block0`` ... ``block{depth-1}``.
    num_heads: attention heads per block.
    mlp_ratio: the MLP's hidden units per residual unit.
    patch_size: side of the square patches (4 on 28 x 28: 7 x 7 tokens).
    dtype: compute dtype; parameters stay float32.
  """

  num_classes: int = 10
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 2.0
  patch_size: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # Nothing behaves differently in training.
    if self.width % self.num_heads:
      raise ValueError(
          f"ViT width={self.width} must be a multiple of num_heads="
          f"{self.num_heads} (each head reads width / num_heads units); "
          "change one of them, e.g. num_heads=4 with width=32.")
    _, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(
          f"ViT patch_size={p} must divide the image sides, got {h} x {w}; "
          "e.g. patch_size=4 for 28 x 28, 2 for 8 x 8.")
    x = PatchEmbedding(self.width, p, self.dtype, name="embed")(x)
    n, gh, gw, d = x.shape
    x = x.reshape(n, gh * gw, d)  # row-major: the order of a CNN's positions
    mlp_dim = max(1, round(self.mlp_ratio * self.width))
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, mlp_dim, self.dtype,
                       name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    return classifier_head(jnp.mean(x, axis=1), self.num_classes, self.dtype)

