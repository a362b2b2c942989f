"""Executing packed weights: kernels, the shared-input memo, layer-stacked reads, and the hooks.

A `PackedLinear` / `PackedEmbedding` (`duquant_jax.packed`, `duquant_jax.embedding`) is data; this
module runs it. What to run is an `Execution` (which W4A8 / weight-only matmul and which online
transform implementation, `duquant_jax.kernels`; whether stacked layer weights are read in place),
a frozen, hashable config that never goes into the weights or a checkpoint. The same packed tree
runs under any execution; on the CPU, forcing the XLA paths or slicing the stacked layers gives
the actions automatic dispatch gives, bit for bit.

Entry points:
  - `PackedRuntime(execution)`: the `models.runtime.Runtime` of our pi0 / pi0.5 model, so
    `Policy(cfg, runtime=PackedRuntime())` runs packed (and float) param trees;
  - `quantized_apply(module, variables, ...)`: any flax linen module whose `Dense` /
    `DenseGeneral` / `Einsum` kernels are packed (`packed_interceptor`);
  - `apply_packed(w, x)`, `matmul`, `einsum`: one packed linear on an array;
  - `lookup(table, tokens)`: rows of a packed token table.
Flax NNX modules run through `duquant_jax.nnx_models.quantized_nnx_apply`, openpi's own model
through `duquant_jax.openpi_runtime`.

Example:
  packed = quantize_params(params, cfg, stats)
  policy = get_policy("pi0", "demo", runtime=PackedRuntime())
  actions = jax.jit(policy.sample_actions)(packed, obs, rng)      # the pi0 policy
  y = quantized_apply(module, {"params": packed}, x)                # any flax module
  xla_only = PackedRuntime(Execution(matmul="xla", transform="xla"))

Axes: M rows of one call, K input features, N output features, L stacked layers, B T D F as the
model's einsums name them. DuQuant: Lin et al., NeurIPS 2024.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ContextManager, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from duquant_jax import kernels
from duquant_jax.embedding import PackedEmbedding, dequantize_rows
from duquant_jax.kernels import xla
from duquant_jax.layouts import split_eqn
from duquant_jax.models.flax_linear import LINEAR_MODULES, dense_contraction
from duquant_jax.models.runtime import STACKED, FloatRuntime
from duquant_jax.packed import PackedLinear
from duquant_jax.transforms import InputTransform, restore_output


@dataclasses.dataclass(frozen=True, kw_only=True)
class Execution:
  """How packed weights run; a static (hashable) choice, never stored in the weights.

  Attributes:
    matmul: the W4A8 (or weight-only) matmul implementation, one of `kernels.IMPLEMENTATIONS`;
      None: chosen per call by platform and shape.
    transform: the online transform + activation quantizer implementation, one of
      `kernels.TRANSFORM_IMPLEMENTATIONS`; None: chosen per call.
    stacked_in_place: hand packed Gemma layer weights to the layer scan whole, with the layer's
      index, so that a kernel reads the layer in place instead of a per-layer slice copy
      (`stack_in_place`). The same numbers either way; its speed is measured in BENCHMARKS.md,
      "Policy latency".

  Raises:
    ValueError: an unknown implementation name.
  """

  matmul: Optional[str] = None
  transform: Optional[str] = None
  stacked_in_place: bool = True

  def __post_init__(self):
    if self.matmul not in kernels.IMPLEMENTATIONS:
      raise ValueError(f"Execution.matmul={self.matmul!r} is not one of {kernels.IMPLEMENTATIONS}")
    if self.transform not in kernels.TRANSFORM_IMPLEMENTATIONS:
      raise ValueError(f"Execution.transform={self.transform!r} is not one of "
                       f"{kernels.TRANSFORM_IMPLEMENTATIONS}")


AUTO = Execution()


# ----------------------------------------------------------------------------------------------
# One packed linear.


def kernel_transform(w: PackedLinear) -> Optional[InputTransform]:
  """The online transform of `w` in the form kernels read (`InputTransform.materialized`)."""
  return None if w.transform is None else w.transform.materialized()


def quantize_input(w: PackedLinear, x2: jax.Array, execution: Execution = AUTO):
  """x2 (M, K) -> what the integer matmul of `w` (one layer) reads.

  Returns:
    (xq, sx, zx): the online transform and the activation quantizer (per token, or static with
    `w.act_scale`: then sx, zx are (1, 1) and xq has M rounded up to a multiple of 8 rows); for a
    weight-only linear (or call: `w.quantizes`), the transformed x2 in x2's dtype.
  """
  if not w.quantizes(x2.shape[0]):
    return kernels.transform_only(x2, kernel_transform(w), implementation=execution.transform)
  if w.act_scale is not None:
    # Any remaining block rotation as the row-major multiply-reduce form (no transposes); the
    # quantizer after it is elementwise. (On the GPU an online rotation here measured far
    # slower than the whole gain of static scales: docs/design.md.)
    x = kernels.transform_only(x2, kernel_transform(w),
                               implementation=execution.transform or "xla_reduce")
    # Rows padded to a multiple of 8, the token tiling of the Mosaic kernels: the pad fuses into
    # this elementwise quantizer, where padding its int8 output would be an op of its own.
    # Every row is quantized and multiplied on its own, so the first M rows are unchanged.
    x = jnp.pad(x, ((0, -x.shape[0] % 8), (0, 0)))
    return xla.quantize_static(x, w.act_scale, w.act_zero, w.act_bits)
  return kernels.transform_quantize(x2, kernel_transform(w), w.act_bits,
                                    symmetric=w.act_symmetric, clip_ratio=w.act_clip,
                                    implementation=execution.transform)


def share_key(w: PackedLinear, execution: Execution = AUTO):
  """A hashable key equal for linears whose `quantize_input` gives the same result for the same
  input (one `input_group`: one online transform, one activation quantizer), or None if `w`
  shares nothing. Callers add the input's shape: whether it is quantized depends on M."""
  if w.input_group is None or w.mode != "int" or w.bits is None:
    return None
  if w.act_bits is None:  # weight-only: what is shared is the transformed input, if any
    return None if w.transform is None else (w.input_group, None, execution.transform)
  return (w.input_group, w.act_bits, w.act_symmetric, w.act_clip, w.act_min_tokens,
          execution.transform, w.act_scale is not None)


def matmul(w: PackedLinear, x2: jax.Array, execution: Execution = AUTO, *, quantized=None,
           layer: Optional[jax.Array] = None) -> jax.Array:
  """x2 (M, K) in the linear's input layout -> x2 W2 (M, N) in x2's dtype.

  Args:
    w: the packed linear, one layer (no stack axes), or stacked over one leading axis with `layer`.
    x2: (M, K) activations.
    execution: which implementations run.
    quantized: `quantize_input(w, x2)`, already computed for another member of w's input group
      (same `share_key`); None computes it here.
    layer: None for one layer, or the (traced) index of the layer to apply in a stacked weight:
      the W4A8 or weight-only matmul then gets the stacked codes and scales with the index (a
      kernel reads that layer in place, `kernels.w4a8_matmul`), everything else is sliced.

  Returns:
    (M, N) in x2's dtype.
  """
  one = w if layer is None else w.at_layer(layer)  # slices no path reads are dropped
  dtype = x2.dtype
  quantizes = one.quantizes(x2.shape[0])
  # Without an output rotation the matmul writes x's dtype: half the bytes of a float32 result
  # for bf16 activations (prefix gate/up: 107 MB per layer in float32).
  out_dtype = jnp.float32 if one.out_rot is not None else dtype
  integer = one.mode == "int" and one.bits is not None  # bits None: float weights, float path
  if quantizes and integer:
    xq, sx, zx = quantize_input(one, x2, execution) if quantized is None else quantized
    if layer is not None and one.act_scale is not None:
      sx, zx = _static_scales(w, layer)
    y = kernels.w4a8_matmul(xq, sx, zx, w.codes, _f32(w.scale), _f32(w.zero),
                            out_dtype=out_dtype, implementation=execution.matmul, layer=layer)
    y = y[:x2.shape[0]]  # a static quantizer's padding rows
  elif integer:  # weight-only: codes read packed
    x = quantize_input(one, x2, execution) if quantized is None else quantized
    y = kernels.weight_only_matmul(x, w.codes, _f32(w.scale), _f32(w.zero), out_dtype=out_dtype,
                                   implementation=execution.matmul, layer=layer)
  else:
    x = x2.astype(jnp.float32)
    # Float weights (bits None) are a check of exactness: no TF32 on the GPU there.
    prec = jax.lax.Precision.HIGHEST if one.bits is None else None
    if one.transform is not None:
      x = one.transform.apply(x, precision=prec)
    if not quantizes:
      y = jnp.matmul(x, one.dequantize().T, precision=prec)
    else:  # simulate: the same quantizers, in float
      if one.act_scale is not None:
        xq, sx, zx = xla.quantize_static(x, one.act_scale, one.act_zero, one.act_bits)
      else:
        xq, sx, zx = xla.quantize_per_token(x, one.act_bits, symmetric=one.act_symmetric,
                                            clip_ratio=one.act_clip)
      y = xla.dequantize_per_token(xq, sx, zx) @ one.dequantize().T
  if one.out_rot is not None:
    y = restore_output(y, one.out_rot)
  return y.astype(dtype)


def shared_matmul(w: PackedLinear, x2: jax.Array, memo: Optional[dict], source,
                  execution: Execution = AUTO, layer: Optional[jax.Array] = None) -> jax.Array:
  """`matmul(w, x2, layer=layer)`, quantizing x2 once per input group within `memo` (None: no
  sharing).

  `source` is the array x2 was flattened from; memo entries are keyed by its identity and hold a
  reference to it, so within one trace a key cannot come back for another array.
  """
  key = None if memo is None else share_key(w, execution)
  if key is None:
    return matmul(w, x2, execution, layer=layer)
  key = (key, id(source), x2.shape)
  if key not in memo:
    one = w if layer is None else w.at_layer(layer)
    memo[key] = (source, quantize_input(one, x2, execution))
  return matmul(w, x2, execution, quantized=memo[key][1], layer=layer)


def einsum(w: PackedLinear, eqn: str, x: jax.Array, execution: Execution = AUTO, *,
           memo: Optional[dict] = None, layer: Optional[jax.Array] = None) -> jax.Array:
  """`jnp.einsum(eqn, x, W)` with W the packed weight `w` (the eqn the float weight was used with).

  Args:
    w: the packed weight; one layer, or stacked over one leading axis with `layer`.
    eqn: the model's einsum, e.g. "BTD,NDH->BTNH"; its weight operand must be `w.w_spec`.
    x: the activation operand.
    execution: which implementations run.
    memo: a dict shared by the linears of one call site that read the same x (a Gemma
      attention's q and kv): the first member of an input group quantizes x, the others reuse it.
    layer: for a weight stacked over one leading layer axis, the (traced) layer to apply.

  Returns:
    The einsum's output in x's dtype.

  Raises:
    ValueError: an eqn naming other weight axes; stack axes that `layer` does not account for.
  """
  x_spec, w_spec, y_spec = split_eqn(eqn)
  if w_spec != w.w_spec:
    raise ValueError(f"einsum {eqn!r} names weight axes {w_spec!r} but this packed weight was "
                     f"built for {w.w_spec!r}")
  if w.codes.ndim != (2 if layer is None else 3):
    raise ValueError(f"packed weight has stack axes {w.codes.shape[:-2]}; apply it inside the "
                     "scanned module, or pass the layer index of a single stack axis")
  contract = "".join(c for c in w_spec if c in x_spec and c not in y_spec)
  outs = "".join(c for c in w_spec if c not in contract)
  batch = "".join(c for c in x_spec if c not in contract)
  sizes = dict(zip(x_spec, x.shape))
  sizes.update(zip(w_spec, w.w_shape))
  x2 = jnp.einsum(f"{x_spec}->{batch}{contract}", x)
  m = math.prod(sizes[c] for c in batch)
  x2 = x2.reshape(m, w.in_features)
  y2 = shared_matmul(w, x2, memo, x, execution, layer)
  y = y2.reshape(*(sizes[c] for c in batch + outs))
  return jnp.einsum(f"{batch}{outs}->{y_spec}", y)


@functools.partial(jax.jit, static_argnames="execution")
def apply_packed(w: PackedLinear, x: jax.Array, execution: Execution = AUTO) -> jax.Array:
  """y = x W for one (unstacked) packed linear on a raw array, jitted once per shape and format.

  Args:
    w: a PackedLinear without stack axes.
    x: (..., K) in the linear's flattened input layout (K = `w.in_features`).
    execution: which implementations run.

  Returns:
    (..., N) in x's dtype, N = `w.out_features` (the weight's non-contracted axes, flattened in the
    weight's order; for a flax Dense kernel (K, N) just N).

  Raises:
    ValueError: a stacked weight, or x whose last axis is not K.
  """
  if w.codes.ndim != 2:
    raise ValueError(f"apply_packed: weight has stack axes {w.codes.shape[:-2]}; slice a layer "
                     "first (`PackedLinear.at_layer`)")
  if x.shape[-1] != w.in_features:
    raise ValueError(f"apply_packed: {x.shape=} does not end in K={w.in_features}")
  y = matmul(w, x.reshape(-1, w.in_features), execution)
  return y.reshape(*x.shape[:-1], w.out_features)


def gated_mlp(w_gating: Any, w_linear: Any, x: jax.Array, execution: Execution = AUTO,
              layer: Optional[jax.Array] = None) -> Optional[jax.Array]:
  """A Gemma MLP `linear(gelu(gate) * up)` ("BTD,2DF->2BTF", then "BTF,FD->BTD") on packed
  weights with its hidden activation never in float memory, or None where that form does not apply.

  It applies when both weights are one layer of W4A8 (or W8A8) integer weights, the gate/up weight has
  per-channel scales and no output rotation, and the down projection reads its input through a
  static 8-bit quantizer with no online transform (the `fast` preset): then one pass
  (`kernels.gated_w4a8`) writes the hidden activation as the down projection's int8 codes,
  instead of writing gate and up and reading them back to quantize (the saving is measured in
  BENCHMARKS.md). gate and up are float32 here (the unfused form rounds them to x's dtype first).

  Args:
    w_gating: the (2, D, F) gate/up weight; w_linear: the (F, D) down projection.
    x: (..., D) input of the MLP.
    execution: which implementations run.
    layer: None, or a traced int32 scalar: both weights are stacked over one leading layer axis
      and this layer is applied (the kernels read it in place).

  Returns:
    (..., D) in x's dtype, or None.
  """
  if not (isinstance(w_gating, PackedLinear) and isinstance(w_linear, PackedLinear)):
    return None
  d = x.shape[-1]
  m = math.prod(x.shape[:-1])
  ndim = 2 if layer is None else 3
  if not (w_gating.codes.ndim == ndim and w_linear.codes.ndim == ndim):
    return None
  # g, l: this layer's fields (static scales, flags); the kernels get w_gating's and w_linear's
  # codes and scales whole, with the layer index.
  g, l = (w_gating, w_linear) if layer is None else (w_gating.at_layer(layer),
                                                      w_linear.at_layer(layer))
  if not (g.w_spec == "2DF" and l.w_spec == "FD" and g.codes.ndim == 2 and l.codes.ndim == 2
          and g.mode == "int" and l.mode == "int" and g.codes.dtype in (jnp.int4, jnp.int8)
          and l.codes.dtype in (jnp.int4, jnp.int8)
          and g.out_rot is None and g.scale.shape[-1] == 1 and g.act_bits == 8 and g.quantizes(m)
          and l.act_scale is not None and l.act_bits == 8 and l.transform is None
          and l.quantizes(m) and 2 * l.in_features == g.out_features and g.in_features == d):
    return None
  xq, sx, zx = quantize_input(g, x.reshape(m, d), execution)
  # Static scales go to the kernels whole, with the layer index (the kernels read them as
  # scalars in place); the hidden codes keep xq's rows (padded to a multiple of 8) through
  # both kernels, so nothing is padded or sliced between them.
  if g.act_scale is not None:
    sx, zx = _static_scales(w_gating, layer)
  sh, zh = _static_scales(w_linear, layer)
  impl = execution.matmul if execution.matmul in (None, "mosaic") else "xla"
  hq = kernels.gated_w4a8(xq, sx, zx, w_gating.codes, _f32(w_gating.scale), _f32(w_gating.zero),
                          _f32(w_linear.act_scale), _f32(w_linear.act_zero), implementation=impl,
                          layer=layer)
  out_dtype = jnp.float32 if l.out_rot is not None else x.dtype
  y = kernels.w4a8_matmul(hq, sh, zh, w_linear.codes, _f32(w_linear.scale), _f32(w_linear.zero),
                          out_dtype=out_dtype, implementation=execution.matmul, layer=layer)[:m]
  if l.out_rot is not None:
    y = restore_output(y, l.out_rot)
  return y.astype(x.dtype).reshape(*x.shape[:-1], l.out_features)


def lookup(table: PackedEmbedding, tokens: jax.Array) -> jax.Array:
  """Rows of a packed token table at tokens (...,) int -> (..., D) in `table.dtype`, dequantizing
  only the gathered rows."""
  rows = dequantize_rows(table.codes[tokens], table.scale[tokens],
                         None if table.zero is None else table.zero[tokens])
  return rows.astype(table.dtype)


def _static_scales(w: PackedLinear, layer: Optional[jax.Array]):
  """`w`'s static activation scale and zero point as the matmuls take them, float32: (1, 1) for
  one layer, or the stack's (L, 1, 1) with a layer index (the kernels read them in place)."""
  shape = (1, 1) if layer is None else (-1, 1, 1)
  as_matmul = lambda a: None if a is None else a.reshape(shape).astype(jnp.float32)
  return as_matmul(w.act_scale), as_matmul(w.act_zero)


def _f32(a: Optional[jax.Array]) -> Optional[jax.Array]:
  """Scales / zero points as the kernels read them (`compact` storage keeps float16 / int8)."""
  return None if a is None else a.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Stacked layer weights read in place.


@flax.struct.dataclass
class LayerIndex:
  """Stands in `params` where `stack_in_place` moved a stacked packed weight to the `STACKED`
  collection: index (L,) = arange(L), which `nn.scan` slices to the running layer's index."""

  index: jax.Array


@dataclasses.dataclass(frozen=True)
class LayerView:
  """Layer `index` of a stacked packed weight, applied without slicing it first (at trace time)."""

  stacked: PackedLinear
  index: jax.Array


def stack_in_place(params: Any) -> dict:
  """`{"params": params}`, except that the packed weights of Gemma's scanned layers move, whole,
  to the `STACKED` collection, which the model's layer scan broadcasts instead of slicing.

  `nn.scan` hands every layer a slice of each stacked param; for a GEMM operand XLA materialises
  that slice, a copy of the layer's weight per layer and call (its cost is measured in
  BENCHMARKS.md, "Policy latency"). With the weight broadcast and its layer index sliced
  instead, a kernel can read the layer in place (`einsum(..., layer=)`).
  """
  def visit(tree, out, in_layers):
    if not isinstance(tree, dict):
      return tree
    new = {}
    for key, value in tree.items():
      # Only the weights the model reads through `gemma.weight` move; a flax Dense's packed
      # `kernel` (pi0.5's adaptive-norm modulation) is read by the Dense interceptor, a slice per
      # layer.
      if in_layers and key != "kernel" and isinstance(value, PackedLinear) \
          and value.codes.ndim == 3:
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


# ----------------------------------------------------------------------------------------------
# Flax hooks: Dense / DenseGeneral / Einsum kernels, and our model's `Runtime`.


def packed_interceptor(next_fun, args, kwargs, context, memo: Optional[dict] = None,
                       execution: Execution = AUTO):
  """`nn.intercept_methods` hook: flax `Dense` / `DenseGeneral` / `Einsum` with a packed kernel.

  A `PackedLinear` stands where the float kernel was; the module's own `__call__` would reject
  it, so the call is computed here: flatten the contracted trailing axes of x, run the packed
  matmul, restore the feature axes, add the bias. Other modules and float kernels pass through.
  With a `memo` dict bound (`functools.partial(packed_interceptor, memo={})`, one per traced
  call), packed kernels of one input group that read the same x (SigLIP's query, key and value)
  quantize it once.
  """
  module = context.module
  if context.method_name != "__call__" or not isinstance(module, LINEAR_MODULES):
    return next_fun(*args, **kwargs)
  if not module.has_variable("params", "kernel"):
    return next_fun(*args, **kwargs)
  kernel = module.get_variable("params", "kernel")
  if not isinstance(kernel, PackedLinear):
    return next_fun(*args, **kwargs)
  x = args[0] if args else kwargs["inputs"]
  n_contract, features = dense_contraction(module, x, args, kwargs)
  batch = x.shape[:x.ndim - n_contract]
  y = shared_matmul(kernel, x.reshape(-1, kernel.in_features), memo, x, execution)
  y = y.reshape(*batch, *features)
  if module.use_bias and module.has_variable("params", "bias"):
    y = y + jnp.asarray(module.get_variable("params", "bias")).reshape(features).astype(y.dtype)
  return y


def intercepting(execution: Execution = AUTO) -> ContextManager:
  """`nn.intercept_methods(packed_interceptor)` with a fresh shared-input memo: enter it once per
  traced call."""
  return nn.intercept_methods(functools.partial(packed_interceptor, memo={}, execution=execution))


def quantized_apply(module: nn.Module, variables: Any, *args, execution: Execution = AUTO,
                    **kwargs):
  """`module.apply(variables, ...)` with packed Dense / DenseGeneral / Einsum kernels run quantized
  (kernels of one input group that read the same input quantize it once per call)."""
  with intercepting(execution):
    return module.apply(variables, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class PackedRuntime(FloatRuntime):
  """Our model's `Runtime` (`models.runtime`) for param trees with packed leaves (float leaves run
  as `FloatRuntime` runs them).

  Example:
    policy = Policy(cfg, runtime=PackedRuntime(Execution(matmul="xla")))
    actions = jax.jit(policy.sample_actions)(packed, obs, rng)
  """

  execution: Execution = AUTO

  def variables(self, params: Any) -> dict:
    return stack_in_place(params) if self.execution.stacked_in_place else {"params": params}

  def context(self) -> ContextManager:
    return intercepting(self.execution)

  def weight(self, stored: Any, broadcast: Any) -> Any:
    if isinstance(stored, LayerIndex):
      return LayerView(broadcast, stored.index)
    if isinstance(stored, (PackedLinear, PackedEmbedding)):
      return stored
    return super().weight(stored, broadcast)

  def einsum(self, eqn: str, x: jax.Array, w: Any, memo: Optional[dict] = None) -> jax.Array:
    if isinstance(w, LayerView):
      return einsum(w.stacked, eqn, x, self.execution, memo=memo, layer=w.index)
    if isinstance(w, PackedLinear):
      return einsum(w, eqn, x, self.execution, memo=memo)
    if isinstance(w, PackedEmbedding):
      raise TypeError(f"a PackedEmbedding is not an einsum weight ({eqn!r})")
    return super().einsum(eqn, x, w, memo)

  def gated_mlp(self, w_gating: Any, w_linear: Any, x: jax.Array) -> Optional[jax.Array]:
    if isinstance(w_linear, LayerView):
      if not isinstance(w_gating, LayerView):
        return None
      return gated_mlp(w_gating.stacked, w_linear.stacked, x, self.execution, w_linear.index)
    return gated_mlp(w_gating, w_linear, x, self.execution)

  def embed(self, table: Any, tokens: jax.Array) -> jax.Array:
    if isinstance(table, PackedEmbedding):  # gather int4 rows, dequantize only those
      return lookup(table, tokens)
    return super().embed(table, tokens)
