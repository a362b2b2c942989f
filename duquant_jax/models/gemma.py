"""Gemma transformer with a second expert sharing attention, in openpi's param layout.

Follows openpi's `models/gemma.py` (itself from big_vision): a list of experts (index 0 the PaliGemma
LLM, index 1 the action expert, whose params carry the suffix `_1`) run their own norms, projections and
MLPs but attend jointly over the concatenation of their tokens. Layers are stacked with `nn.scan`, so
every layer param has a leading depth axis L.

Axes: B batch, T query tokens, S key tokens, N query heads, K kv heads, G = N // K, H head dim, D width,
F MLP hidden width, L layers.

Every weight multiplication goes through the modules' `runtime` (`models.runtime.Runtime`):
`runtime.einsum(eqn, x, w)` for each linear, `runtime.gated_mlp` for a whole MLP, `runtime.embed`
for the token table. The default runs float einsums; a runtime may put other objects in the param
tree (`weight`) and apply them its own way.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.models import attention_kernel
from duquant_jax.models.config import GemmaConfig
from duquant_jax.models.runtime import STACKED, FloatRuntime, Runtime

_FLOAT = FloatRuntime()


def _name(name: str, i: int) -> str:
  return name if i == 0 else f"{name}_{i}"


def weight(module: nn.Module, name: str, init_fn, shape: tuple[int, ...], runtime: Runtime):
  """`module.param(name, ...)`, except that a stored value that is not an array goes to
  `runtime.weight` (with the `STACKED` collection's entry of that name, if any).

  flax checks an existing param's leaves against the init shape; a runtime's own weight object
  (a pytree of other leaves) would fail that check, so it is read with `get_variable` instead.
  """
  if module.has_variable("params", name):
    value = module.get_variable("params", name)
    if not isinstance(value, (jax.Array, np.ndarray)):
      broadcast = (module.get_variable(STACKED, name) if module.has_variable(STACKED, name)
                   else None)
      return runtime.weight(value, broadcast)
  return module.param(name, init_fn, shape)


class Einsum(nn.Module):
  """A weight `w` of `shape` applied by an einsum equation given at call time."""

  shape: tuple[int, ...]
  init_fn: Any = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1)
  runtime: Runtime = _FLOAT

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array, memo: dict | None = None) -> jax.Array:
    w = weight(self, "w", self.init_fn, self.shape, self.runtime)
    # Calibration reads linear inputs from here (only stored when "intermediates" is mutable).
    self.sow("intermediates", "w_input", x)
    return self.runtime.einsum(eqn, x, w, memo)


class RMSNorm(nn.Module):
  """RMSNorm with (1 + scale); with `cond` it is pi0.5's adaptive RMSNorm (scale, shift, gate)."""

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    dtype = x.dtype
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    normed = x.astype(jnp.float32) * jax.lax.rsqrt(var + 1e-6)
    if cond is None:
      scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
      return (normed * (1 + scale)).astype(dtype), None
    # openpi zero-initialises this Dense; synthetic weights randomise it (see lab/synthetic.py).
    modulation = nn.Dense(x.shape[-1] * 3, kernel_init=nn.initializers.zeros, dtype=dtype)(cond)
    scale, shift, gate = jnp.split(modulation[:, None, :].astype(jnp.float32), 3, axis=-1)
    return (normed * (1 + scale) + shift).astype(dtype), gate.astype(dtype)


class Embedder(nn.Module):
  """The token embedding table `input_embedding` (V, D), read by `runtime.embed`."""

  vocab_size: int
  embed_dim: int
  runtime: Runtime = _FLOAT

  def setup(self):
    self.input_embedding_table = weight(self, "input_embedding", nn.initializers.normal(),
                                        (self.vocab_size, self.embed_dim), self.runtime)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """tokens (B, T) int -> (B, T, D) in the table's dtype, scaled by sqrt(D)."""
    x = self.runtime.embed(self.input_embedding_table, tokens)
    return x * jnp.sqrt(self.embed_dim).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000) -> jax.Array:
  """Rotary embedding of x (B, T, N, H) at integer positions (B, T)."""
  freq_exponents = (2.0 / x.shape[-1]) * jnp.arange(x.shape[-1] // 2, dtype=jnp.float32)
  timescale = max_wavelength**freq_exponents
  radians = positions[..., None] / timescale[None, None, :]
  radians = radians[..., None, :]
  sin, cos = jnp.sin(radians), jnp.cos(radians)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
  """Multi-query attention over the concatenated tokens of all experts, with an optional KV cache.

  `attention` (`Pi0Config.attention`): "einsum" computes it as openpi does; "xla" / "cudnn" with
  `jax.nn.dot_product_attention` of that implementation; "pallas" with `models.attention_kernel`'s
  kernel (the einsum form where not lowered for CUDA); the einsum form whenever "intermediates"
  is mutable (calibration reads the logits, which only the einsum form has).
  """

  configs: Sequence[GemmaConfig]
  runtime: Runtime = _FLOAT
  attention: str = "einsum"

  @nn.compact
  def __call__(self, xs, positions, attn_mask, kv_cache):
    cfg0 = self.configs[0]
    qs, ks, vs = [], [], []
    for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
      if x is None:
        continue
      q_einsum = Einsum((cfg.num_heads, cfg.width, cfg.head_dim), runtime=self.runtime,
                        name=_name("q_einsum", i))
      kv_einsum = Einsum((2, cfg.num_kv_heads, cfg.width, cfg.head_dim), runtime=self.runtime,
                         name=_name("kv_einsum", i))
      memo = {}  # q and kv read the same x: a runtime may prepare it once for both
      qs.append(q_einsum("BTD,NDH->BTNH", x, memo))
      k, v = kv_einsum("BSD,2KDH->2BSKH", x, memo)
      ks.append(k)
      vs.append(v)
    q, k, v = (jnp.concatenate(y, axis=1) for y in (qs, ks, vs))

    q = apply_rope(q, positions) * cfg0.head_dim**-0.5
    k = apply_rope(k, positions)
    new_k, new_v = k, v
    if kv_cache is not None:
      cache_k, cache_v = kv_cache
      k = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
      v = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
    if attn_mask.shape != (q.shape[0], q.shape[1], k.shape[1]):
      raise ValueError(f"attention mask {attn_mask.shape} does not match (B, T, S) = "
                       f"{(q.shape[0], q.shape[1], k.shape[1])}")

    if self.attention == "einsum" or self.is_mutable_collection("intermediates"):
      encoded = self._einsum_attention(xs, q, k, v, attn_mask)
    elif self.attention == "pallas":
      # The kernel reads the cache where it lies: the concatenation above is then only the
      # returned cache, which a flow step drops.
      encoded = attention_kernel.attention(q, new_k, new_v, attn_mask, cache=kv_cache)
    else:
      # q is already scaled, rounded to its dtype as the einsum form rounds it: scale 1 keeps the
      # same logits (jax's "xla" form multiplies its float32 logits by the scale).
      encoded = jax.nn.dot_product_attention(q, k, v, mask=attn_mask[:, None], scale=1.0,
                                             implementation=self.attention)

    out, start = [], 0
    for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
      if x is None:
        out.append(None)
        continue
      end = start + x.shape[1]
      attn_vec = Einsum((cfg.num_heads, cfg.head_dim, cfg.width), runtime=self.runtime,
                        name=_name("attn_vec_einsum", i))
      y = attn_vec("BTNH,NHD->BTD", encoded[:, start:end])
      self.sow("intermediates", _name("output", i), y)  # (B, T_i, D), for the same calibration
      out.append(y)
      start = end
    return out, (k, v)

  def _einsum_attention(self, xs, q, k, v, attn_mask):
    """openpi's form: q (B, T, N, H) pre-scaled, k, v (B, S, K, H), mask (B, T, S) -> (B, T, N, H)."""

    def sow_logits(logits):
      # Attention calibration (`duquant_jax.attention_balance`) reads each expert's logits
      # (B, K, G, T_i, S) and mask (B, T_i, S) here (stored only when "intermediates" is mutable).
      start = 0
      for i, x in enumerate(xs):
        if x is not None:
          end = start + x.shape[1]
          self.sow("intermediates", _name("logits", i), logits[:, :, :, start:end])
          self.sow("intermediates", _name("logits_mask", i), attn_mask[:, start:end])
          start = end

    return attention_kernel.einsum_attention(q, k, v, attn_mask, logits_hook=sow_logits)


class FeedForward(nn.Module):
  """Gated GELU MLP: `gating_einsum` (2, D, F) holds gate and up, `linear` (F, D) is the down projection."""

  features: int
  hidden_dim: int
  runtime: Runtime = _FLOAT

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1)
    w_gating = weight(self, "gating_einsum", init, (2, self.features, self.hidden_dim), self.runtime)
    self.sow("intermediates", "gating_einsum_input", x)
    w_linear = weight(self, "linear", init, (self.hidden_dim, self.features), self.runtime)
    y = self.runtime.gated_mlp(w_gating, w_linear, x)  # a runtime's fused form, if it has one
    if y is not None:
      return y
    gate, up = self.runtime.einsum("BTD,2DF->2BTF", x, w_gating)
    hidden = nn.gelu(gate) * up
    self.sow("intermediates", "linear_input", hidden)
    return self.runtime.einsum("BTF,FD->BTD", hidden, w_linear)


def _gated_residual(x, y, gate):
  if x is None:
    return None
  return x + y if gate is None else x + y * gate


class Block(nn.Module):
  """One transformer layer for all experts; scanned over depth by `Gemma`."""

  configs: Sequence[GemmaConfig]
  runtime: Runtime = _FLOAT
  attention: str = "einsum"

  @nn.compact
  def __call__(self, xs, kv_cache, positions, attn_mask, adarms_cond):
    normed, gates = [], []
    for i, x in enumerate(xs):
      n, g = (RMSNorm(name=_name("pre_attention_norm", i))(x, adarms_cond[i]) if x is not None
              else (None, None))
      normed.append(n)
      gates.append(g)
    attn_out, kv_cache = Attention(self.configs, self.runtime, self.attention, name="attn")(
        normed, positions, attn_mask, kv_cache)
    xs = [_gated_residual(x, y, g) for x, y, g in zip(xs, attn_out, gates)]

    out = []
    for i, (x, cfg) in enumerate(zip(xs, self.configs)):
      if x is None:
        out.append(None)
        continue
      n, g = RMSNorm(name=_name("pre_ffw_norm", i))(x, adarms_cond[i])
      y = FeedForward(cfg.width, cfg.mlp_dim, self.runtime, name=_name("mlp", i))(n)
      out.append(_gated_residual(x, y, g))
    return out, kv_cache


class Gemma(nn.Module):
  """The mixture of experts: `embed` text tokens, or run `__call__` on a list of per-expert tokens."""

  configs: Sequence[GemmaConfig]
  vocab_size: int
  unroll_layers: bool = False
  runtime: Runtime = _FLOAT
  attention: str = "einsum"  # `Attention.attention`

  def setup(self):
    self.embedder = Embedder(self.vocab_size, self.configs[0].width, self.runtime, name="embedder")
    self.layers = nn.scan(
        Block,
        variable_axes={"params": 0, "intermediates": 0},
        variable_broadcast=STACKED,  # whole to every layer (`models.runtime.STACKED`)
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=self.configs[0].depth,
        unroll=self.configs[0].depth if self.unroll_layers else 1,
    )(self.configs, self.runtime, self.attention, name="layers")
    self.final_norms = [RMSNorm(name=_name("final_norm", i)) for i in range(len(self.configs))]

  def embed(self, tokens: jax.Array) -> jax.Array:
    return self.embedder.encode(tokens)

  def __call__(self, xs, positions, attn_mask, kv_cache=None, adarms_cond=None):
    """Runs all layers.

    Args:
      xs: per expert, tokens (B, T_i, D_i) or None for an expert with no tokens in this call.
      positions: (B, sum T_i) int positions for RoPE.
      attn_mask: (B, sum T_i, S) bool, S = cached tokens + sum T_i.
      kv_cache: None, or (k, v) each (L, B, S_cache, K, H) from an earlier call.
      adarms_cond: per expert, None or (B, D_i) conditioning of adaptive RMSNorm.

    Returns:
      (per-expert outputs after the final norm, the new kv cache (k, v) each (L, B, S, K, H)).
    """
    if adarms_cond is None:
      adarms_cond = [None] * len(self.configs)
    xs, kv_cache = self.layers(xs, kv_cache, positions, attn_mask, adarms_cond)
    outs = [f(x, c)[0] if x is not None else None
            for f, x, c in zip(self.final_norms, xs, adarms_cond)]
    return outs, kv_cache


