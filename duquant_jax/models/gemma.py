"""Gemma transformer with a second expert sharing attention, in openpi's param layout.

Follows openpi's `models/gemma.py` (itself from big_vision): a list of experts (index 0 the PaliGemma
LLM, index 1 the action expert, whose params carry the suffix `_1`) run their own norms, projections and
MLPs but attend jointly over the concatenation of their tokens. Layers are stacked with `nn.scan`, so
every layer param has a leading depth axis L.

Axes: B batch, T query tokens, S key tokens, N query heads, K kv heads, G = N // K, H head dim, D width,
F MLP hidden width, L layers.

Every weight multiplication goes through `linear(eqn, x, w)`, which also accepts a packed (quantized)
weight: anything with an `einsum(eqn, x)` method, such as `duquant_jax.PackedLinear`. The token
embedding table may likewise be packed: anything with a `lookup(tokens)` method, such as
`duquant_jax.PackedEmbedding`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from duquant_jax.models.config import GemmaConfig

_BIG_NEG = -2.3819763e38


def _name(name: str, i: int) -> str:
  return name if i == 0 else f"{name}_{i}"


def linear(eqn: str, x: jax.Array, w: Any, memo: dict | None = None) -> jax.Array:
  """`einsum(eqn, x, w)` with w cast to x's dtype, or the packed weight's own (quantized) einsum
  (`memo`: shared by linears reading the same x, so a packed input group quantizes x once)."""
  if hasattr(w, "einsum"):
    return w.einsum(eqn, x, memo)
  return jnp.einsum(eqn, x, jnp.asarray(w).astype(x.dtype))


def _is_packed(value: Any) -> bool:
  return hasattr(value, "einsum") or hasattr(value, "lookup")


# The variable collection that holds stacked packed weights read in place (`stack_in_place`).
STACKED = "stacked"


@flax.struct.dataclass
class LayerIndex:
  """Stands in `params` where `stack_in_place` moved a stacked packed weight to the `stacked`
  collection: index (L,) = arange(L), which `nn.scan` slices to the running layer's index."""

  index: jax.Array


@dataclasses.dataclass(frozen=True)
class _LayerOf:
  """Layer `index` of a stacked packed weight, applied without slicing it first (trace-time only)."""

  stacked: Any
  index: jax.Array

  def einsum(self, eqn: str, x: jax.Array, memo: dict | None = None) -> jax.Array:
    return self.stacked.einsum(eqn, x, memo, layer=self.index)

  def gated_mlp(self, w_gating: Any, x: jax.Array) -> jax.Array | None:
    """The fused Gemma MLP (`PackedLinear.gated_mlp`) on this layer of both stacked weights."""
    if not (isinstance(w_gating, _LayerOf) and hasattr(self.stacked, "gated_mlp")):
      return None
    return self.stacked.gated_mlp(w_gating.stacked, x, layer=self.index)


def stack_in_place(params: Any) -> dict:
  """`{"params": params}`, except that the packed weights of Gemma's scanned layers move, whole,
  to the `stacked` collection, which `Gemma`'s layer scan broadcasts instead of slicing.

  `nn.scan` hands every layer a slice of each stacked param; for a GEMM operand XLA materialises
  that slice, a copy of the layer's weight per layer and call (4.9 ms of the packed pi0's 43 ms
  at batch 1 on the H100, BENCHMARKS.md). With the weight broadcast and its layer index sliced
  instead, a kernel can read the layer in place (`PackedLinear.einsum(..., layer=)`).
  """
  def visit(tree, out, in_layers):
    if not isinstance(tree, dict):
      return tree
    new = {}
    for key, value in tree.items():
      # Only the weights the model reads through `weight()` move; a flax Dense's packed `kernel`
      # (pi0.5's adaptive-norm modulation) is read by the Dense interceptor, a slice per layer.
      if in_layers and key != "kernel" and _is_packed(value) \
          and getattr(value, "codes", None) is not None and value.codes.ndim == 3:
        out[key] = value
        new[key] = LayerIndex(jnp.arange(value.codes.shape[0], dtype=jnp.int32))
      elif isinstance(value, dict):
        sub = {}
        new[key] = visit(value, sub, in_layers or key == "layers")
        if sub:
          out[key] = sub
      else:
        new[key] = value
    return new

  llm = params.get("PaliGemma", {}).get("llm") if isinstance(params, dict) else None
  if llm is None:
    return {"params": params}
  sub = {}
  new_llm = visit(llm, sub, False)
  if not sub:
    return {"params": params}
  new_params = {**params, "PaliGemma": {**params["PaliGemma"], "llm": new_llm}}
  stacked = {"PaliGemma": {"llm": sub}}
  return {"params": new_params, STACKED: stacked}


def weight(module: nn.Module, name: str, init_fn, shape: tuple[int, ...]):
  """`module.param(name, ...)`, except that an existing packed weight is returned as is.

  flax checks an existing param's leaves against the init shape; a packed weight (a pytree of
  codes, scales, transform) has other leaves, so it is read with `get_variable` instead. A
  `LayerIndex` returns that layer of the stacked weight in the `stacked` collection.
  """
  if module.has_variable("params", name):
    value = module.get_variable("params", name)
    if isinstance(value, LayerIndex):
      return _LayerOf(module.get_variable(STACKED, name), value.index)
    if _is_packed(value):
      return value
  return module.param(name, init_fn, shape)


class Einsum(nn.Module):
  """A weight `w` of `shape` applied by an einsum equation given at call time."""

  shape: tuple[int, ...]
  init_fn: Any = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1)

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array, memo: dict | None = None) -> jax.Array:
    w = weight(self, "w", self.init_fn, self.shape)
    # Calibration reads linear inputs from here (only stored when "intermediates" is mutable).
    self.sow("intermediates", "w_input", x)
    return linear(eqn, x, w, memo)


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
    # openpi zero-initialises this Dense; synthetic weights randomise it (see models/synthetic.py).
    modulation = nn.Dense(x.shape[-1] * 3, kernel_init=nn.initializers.zeros, dtype=dtype)(cond)
    scale, shift, gate = jnp.split(modulation[:, None, :].astype(jnp.float32), 3, axis=-1)
    return (normed * (1 + scale) + shift).astype(dtype), gate.astype(dtype)


class Embedder(nn.Module):
  """The token embedding table `input_embedding` (V, D), float or packed (`PackedEmbedding`)."""

  vocab_size: int
  embed_dim: int

  def setup(self):
    self.input_embedding_table = weight(self, "input_embedding", nn.initializers.normal(),
                                        (self.vocab_size, self.embed_dim))

  def encode(self, tokens: jax.Array) -> jax.Array:
    """tokens (B, T) int -> (B, T, D) in the table's dtype, scaled by sqrt(D)."""
    table = self.input_embedding_table
    if hasattr(table, "lookup"):  # packed: gather int4 rows, dequantize only those
      x = table.lookup(tokens)
    else:
      x = jnp.asarray(table)[(tokens,)]
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
  """Multi-query attention over the concatenated tokens of all experts, with an optional KV cache."""

  configs: Sequence[GemmaConfig]

  @nn.compact
  def __call__(self, xs, positions, attn_mask, kv_cache):
    cfg0 = self.configs[0]
    qs, ks, vs = [], [], []
    for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
      if x is None:
        continue
      q_einsum = Einsum((cfg.num_heads, cfg.width, cfg.head_dim), name=_name("q_einsum", i))
      kv_einsum = Einsum((2, cfg.num_kv_heads, cfg.width, cfg.head_dim), name=_name("kv_einsum", i))
      memo = {}  # q and kv read the same x: a packed input group quantizes it once
      qs.append(q_einsum("BTD,NDH->BTNH", x, memo))
      k, v = kv_einsum("BSD,2KDH->2BSKH", x, memo)
      ks.append(k)
      vs.append(v)
    q, k, v = (jnp.concatenate(y, axis=1) for y in (qs, ks, vs))

    q = apply_rope(q, positions) * cfg0.head_dim**-0.5
    k = apply_rope(k, positions)
    if kv_cache is not None:
      cache_k, cache_v = kv_cache
      k = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
      v = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)

    q = q.reshape(*q.shape[:2], cfg0.num_kv_heads, cfg0.num_heads // cfg0.num_kv_heads, cfg0.head_dim)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    if attn_mask.shape != (q.shape[0], q.shape[1], k.shape[1]):
      raise ValueError(f"attention mask {attn_mask.shape} does not match (B, T, S) = "
                       f"{(q.shape[0], q.shape[1], k.shape[1])}")
    # Attention calibration (`duquant_jax.attention_balance`) reads each expert's logits
    # (B, K, G, T_i, S) and mask (B, T_i, S) here (stored only when "intermediates" is mutable).
    start = 0
    for i, x in enumerate(xs):
      if x is not None:
        end = start + x.shape[1]
        self.sow("intermediates", _name("logits", i), logits[:, :, :, start:end])
        self.sow("intermediates", _name("logits_mask", i), attn_mask[:, start:end])
        start = end
    logits = jnp.where(attn_mask[:, None, None, :, :], logits, _BIG_NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(k.dtype)
    encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    encoded = encoded.reshape(*encoded.shape[:2], cfg0.num_heads, cfg0.head_dim)

    out, start = [], 0
    for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
      if x is None:
        out.append(None)
        continue
      end = start + x.shape[1]
      attn_vec = Einsum((cfg.num_heads, cfg.head_dim, cfg.width), name=_name("attn_vec_einsum", i))
      y = attn_vec("BTNH,NHD->BTD", encoded[:, start:end])
      self.sow("intermediates", _name("output", i), y)  # (B, T_i, D), for the same calibration
      out.append(y)
      start = end
    return out, (k, v)


class FeedForward(nn.Module):
  """Gated GELU MLP: `gating_einsum` (2, D, F) holds gate and up, `linear` (F, D) is the down projection."""

  features: int
  hidden_dim: int

  @nn.compact
  def __call__(self, x):
    w_gating = weight(self, "gating_einsum", nn.initializers.lecun_normal(in_axis=-2, out_axis=-1),
                          (2, self.features, self.hidden_dim))
    self.sow("intermediates", "gating_einsum_input", x)
    w_linear = weight(self, "linear", nn.initializers.lecun_normal(in_axis=-2, out_axis=-1),
                          (self.hidden_dim, self.features))
    if hasattr(w_linear, "gated_mlp"):  # packed weights may run the MLP as one fused form
      y = w_linear.gated_mlp(w_gating, x)
      if y is not None:
        return y
    gate, up = linear("BTD,2DF->2BTF", x, w_gating)
    hidden = nn.gelu(gate) * up
    self.sow("intermediates", "linear_input", hidden)
    return linear("BTF,FD->BTD", hidden, w_linear)


def _gated_residual(x, y, gate):
  if x is None:
    return None
  return x + y if gate is None else x + y * gate


class Block(nn.Module):
  """One transformer layer for all experts; scanned over depth by `Gemma`."""

  configs: Sequence[GemmaConfig]

  @nn.compact
  def __call__(self, xs, kv_cache, positions, attn_mask, adarms_cond):
    normed, gates = [], []
    for i, x in enumerate(xs):
      n, g = (RMSNorm(name=_name("pre_attention_norm", i))(x, adarms_cond[i]) if x is not None
              else (None, None))
      normed.append(n)
      gates.append(g)
    attn_out, kv_cache = Attention(self.configs, name="attn")(normed, positions, attn_mask, kv_cache)
    xs = [_gated_residual(x, y, g) for x, y, g in zip(xs, attn_out, gates)]

    out = []
    for i, (x, cfg) in enumerate(zip(xs, self.configs)):
      if x is None:
        out.append(None)
        continue
      n, g = RMSNorm(name=_name("pre_ffw_norm", i))(x, adarms_cond[i])
      y = FeedForward(cfg.width, cfg.mlp_dim, name=_name("mlp", i))(n)
      out.append(_gated_residual(x, y, g))
    return out, kv_cache


class Gemma(nn.Module):
  """The mixture of experts: `embed` text tokens, or run `__call__` on a list of per-expert tokens."""

  configs: Sequence[GemmaConfig]
  vocab_size: int
  unroll_layers: bool = False

  def setup(self):
    self.embedder = Embedder(self.vocab_size, self.configs[0].width, name="embedder")
    self.layers = nn.scan(
        Block,
        variable_axes={"params": 0, "intermediates": 0},
        variable_broadcast=STACKED,  # stacked packed weights, read at a layer index (stack_in_place)
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=self.configs[0].depth,
        unroll=self.configs[0].depth if self.unroll_layers else 1,
    )(self.configs, name="layers")
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


# flax modules whose `kernel` is a linear weight that a packed one may replace.
LINEAR_MODULES = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def dense_contraction(module: nn.Module, x: jax.Array, args: tuple = (),
                      kwargs: dict | None = None) -> tuple[int, tuple[int, ...]]:
  """(how many trailing axes of x the kernel contracts, the output feature shape) of a call of a
  flax `Dense`, `DenseGeneral` or `Einsum` (the forms a 2-D packed view (K, N) can run).

  Raises:
    NotImplementedError: DenseGeneral contracting non-trailing axes (or with batch dims); an
      Einsum that is not `...I,IO->...O`-shaped (`einsum_contraction`).
  """
  if isinstance(module, nn.Dense):
    return 1, (module.features,)
  if isinstance(module, nn.DenseGeneral):
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    if not trailing_axes(axis, x.ndim) or module.batch_dims:
      raise NotImplementedError(f"{module.path}: packed DenseGeneral kernels need trailing "
                                f"contraction axes and no batch_dims ({module.axis=})")
    features = module.features if isinstance(module.features, tuple) else (module.features,)
    return len(axis), features
  eqn = (kwargs or {}).get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
  return einsum_contraction(eqn, tuple(module.shape), "/".join(module.path))


def trailing_axes(axis: Sequence[int], ndim: int) -> bool:
  """Whether `axis` names the trailing axes of an ndim-axis input (flax's DenseGeneral and NNX's
  LinearGeneral contract their axes sorted, so x's flattened trailing axes then line up with the
  kernel's flattened contraction axes)."""
  return sorted(a % ndim for a in axis) == list(range(ndim - len(axis), ndim))


def einsum_contraction(eqn: str, kernel_shape: tuple[int, ...],
                       where: str) -> tuple[int, tuple[int, ...]]:
  """(how many trailing axes of x the kernel contracts, the output feature shape) of
  `einsum(eqn, x, kernel)`, for the form a 2-D packed view runs: `...I,IO->...O`.

  Raises:
    NotImplementedError: other forms (x's trailing axes against the kernel's leading ones, and the
      kernel's other axes trailing the output in order), naming `where`.
  """
  from duquant_jax.layouts import split_eqn
  xs, ws, ys = split_eqn(eqn)
  contract = "".join(c for c in ws if c in xs and c not in ys)
  out = ws[len(contract):]
  if (not xs.endswith(contract) or not ws.startswith(contract) or not ys.endswith(out)
      or any(c in xs for c in out)):
    raise NotImplementedError(f"{where}: a packed Einsum needs the form '...I,IO->...O' "
                              f"(trailing x axes against the kernel's leading axes), got {eqn!r}")
  return len(contract), tuple(kernel_shape[len(contract):])


def packed_dense_interceptor(next_fun, args, kwargs, context, memo: dict | None = None):
  """`nn.intercept_methods` hook running flax `Dense` / `DenseGeneral` / `Einsum` with a packed kernel.

  A packed kernel (anything with `matmul(x2)` over the flattened contraction axes, such as
  `duquant_jax.PackedLinear`) stands where the float kernel was; the module's own `__call__` would
  reject it, so the call is computed here: flatten the contracted trailing axes of x, run the packed
  matmul, restore the feature axes, add the bias. Other modules and float kernels pass through.
  With a `memo` dict bound (`functools.partial(packed_dense_interceptor, memo={})`, one per traced
  call), packed kernels of one input group that read the same x (SigLIP's query, key and value)
  quantize it once.
  """
  module = context.module
  if context.method_name != "__call__" or not isinstance(module, LINEAR_MODULES):
    return next_fun(*args, **kwargs)
  if not module.has_variable("params", "kernel"):
    return next_fun(*args, **kwargs)
  kernel = module.get_variable("params", "kernel")
  if not hasattr(kernel, "matmul"):
    return next_fun(*args, **kwargs)
  x = args[0] if args else kwargs["inputs"]
  n_contract, features = dense_contraction(module, x, args, kwargs)
  batch = x.shape[:x.ndim - n_contract]
  from duquant_jax.packed import shared_matmul
  y = shared_matmul(kernel, x.reshape(-1, kernel.in_features), memo, x).reshape(*batch, *features)
  if module.use_bias and module.has_variable("params", "bias"):
    y = y + jnp.asarray(module.get_variable("params", "bias")).reshape(features).astype(y.dtype)
  return y
