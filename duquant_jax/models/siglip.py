"""SigLIP ViT image encoder in big_vision's param layout (as openpi's `PaliGemma/img`).

Patch embedding (`embedding`, a conv with stride = patch), learned `pos_embedding`, an `nn.scan`-stacked
`Transformer/encoderblock` of pre-LN blocks using flax's `MultiHeadDotProductAttention` (query/key/value
kernels (L, D, N, H), out kernel (L, N, H, D)) and a GELU `MlpBlock`, `encoder_norm`, and a linear `head`
projecting to the LLM width. No pooling: every patch is a token.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from duquant_jax.models.config import SiglipConfig


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    dense = lambda n: nn.Dense(n, dtype=self.dtype_mm, kernel_init=nn.initializers.xavier_uniform())
    x = nn.gelu(dense(self.mlp_dim)(x))  # Dense_0: created (and so named) first
    return dense(d)(x)


def _fused_attention(query, key, value, mask=None, *, implementation):
  """flax's `attention_fn` by `jax.nn.dot_product_attention`: logits and softmax in float32,
  where flax's default computes them in the compute dtype."""
  # As flax's default: q / sqrt(H) rounded to q's dtype, so that only the logits' dtype differs.
  query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
  return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=1.0,
                                      implementation=implementation)


class Encoder1DBlock(nn.Module):
  mlp_dim: int
  num_heads: int
  dtype_mm: str = "float32"
  # `Pi0Config.attention`; flax's own attention while calibrating and under "pallas" (a Gemma
  # kernel: SigLIP's head dim, 72, is no power of two).
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x, _):
    fn = nn.dot_product_attention
    fused = self.attention not in ("einsum", "pallas")
    if fused and not self.is_mutable_collection("intermediates"):
      fn = functools.partial(_fused_attention, implementation=self.attention)
    y = nn.LayerNorm(dtype=self.dtype_mm)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype_mm,
                                        kernel_init=nn.initializers.xavier_uniform(),
                                        attention_fn=fn)(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype_mm)(x)
    return x + MlpBlock(self.mlp_dim, self.dtype_mm)(y), None


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int
  unroll_layers: bool = False
  dtype_mm: str = "float32"
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(Encoder1DBlock, variable_axes={"params": 0, "intermediates": 0},
                     split_rngs={"params": True}, in_axes=nn.broadcast, length=self.depth,
                     unroll=self.depth if self.unroll_layers else 1)
    x, _ = blocks(self.mlp_dim, self.num_heads, self.dtype_mm, self.attention,
                  name="encoderblock")(x, None)
    return nn.LayerNorm(name="encoder_norm", dtype=self.dtype_mm)(x)


class SigLIP(nn.Module):
  """images (B, h, w, 3) in [-1, 1] -> tokens (B, (h/p) * (w/p), out_dim).

  As openpi's (big_vision's) tower with `dtype_mm`: the patch embedding and position embedding in
  float32, the encoder's layer norms, attention and MLPs, and the head, computed in `dtype_mm`
  (openpi passes the policy's dtype, bfloat16). `attention` other than "einsum" computes the
  attention by `jax.nn.dot_product_attention` of that implementation (`Pi0Config.attention`).
  """

  cfg: SiglipConfig
  out_dim: int
  unroll_layers: bool = False
  dtype_mm: str = "float32"
  attention: str = "einsum"

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.cfg
    x = nn.Conv(c.width, (c.patch, c.patch), strides=(c.patch, c.patch), padding="VALID",
                name="embedding", dtype=jnp.float32)(images.astype(jnp.float32))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=1 / d**0.5), (1, h * w, d))
    x = (x + pos).astype(self.dtype_mm)
    x = Encoder(c.depth, c.mlp_dim, c.num_heads, unroll_layers=self.unroll_layers,
                dtype_mm=self.dtype_mm, attention=self.attention, name="Transformer")(x)
    return nn.Dense(self.out_dim, dtype=self.dtype_mm, kernel_init=nn.initializers.zeros,
                    name="head")(x)
