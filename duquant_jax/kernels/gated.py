"""A gated MLP's hidden activation as int8 codes: its reference, its kernel and its dispatch.

    hq = quantize_static(gelu(gate) * up, out_scale, out_zero)

with gate, up the two halves of the float32 W4A8 product `xla.w4a8_matmul(xq, sx, zx, q, sw, zw)`,
q (2F, K) holding gate rows then up rows, and the down projection's static quantizer. On Hopper the
Mosaic kernel (`mosaic_gpu.gated_w4a8`) computes it in one pass, the (M, 2F) product kept in
registers; everywhere else `reference` runs the same arithmetic as XLA ops.

Implementations: None (auto: the first matching rule of `AUTO` / `AUTO_IN_PLACE`, else the
reference), "xla" (the reference), "mosaic" (the kernel where it takes the shape and the trace
is lowered for CUDA, else the reference) and "mosaic_unpacked" (the same on an int8 copy of the
layer's codes made in the call, which the kernel reads with its MMAs in flight). The regimes:
docs/kernels.md, "Gated MLP".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from duquant_jax.kernels import dispatch, mosaic_gpu, xla
from duquant_jax.kernels.dispatch import HOPPER, PLATFORMS, Problem, Rule
from duquant_jax.kernels.w4a8 import (MOSAIC_AUTO_CODES, MOSAIC_CODES,
                                      mosaic_in_place_preferred, mosaic_preferred)

IMPLEMENTATIONS = (None, "xla", "mosaic", "mosaic_unpacked")
# Hopper: from this many tokens an int4 gate/up weight runs on an int8 copy made per call (one
# layer, 64 MiB for gemma_2b), which the kernel reads with its MMAs in flight: 985 against 1054
# us for gemma_2b's MLP at 6528 tokens, the copy included; pi0 at batch 8 70.2 against 72.4 ms
# (H100, BENCHMARKS.md, "Policy latency (H100)").
UNPACKED_MIN_TOKENS = 4096


def reference(xq, sx, zx, q, sw, zw, out_scale, out_zero, *, dot: str = "int8") -> jax.Array:
  """`mosaic_gpu.gated_w4a8` in plain XLA ops (the same float32 arithmetic, unfused): (M, F) int8.

  gelu is the tanh approximation (flax's and Gemma's default); `dot` is `xla.w4a8_matmul`'s.
  """
  f = q.shape[0] // 2
  y = xla.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=jnp.float32, dot=dot)
  h = jax.nn.gelu(y[:, :f], approximate=True) * y[:, f:]
  return xla.quantize_static(h, out_scale, out_zero)[0]


def one_layer(layer: jax.Array | None, xq, sx, zx, q, sw, zw, out_scale, out_zero) -> tuple:
  """`gated_w4a8`'s operands with everything stacked read at `layer` (per-layer activation and
  output scales included): the operands of one layer, as `reference` takes them."""
  return (xq, *dispatch.act_at_layer(layer, sx, zx), *dispatch.at_layer(layer, q, sw, zw),
          *dispatch.at_layer(layer if out_scale.ndim == 2 else None, out_scale, out_zero))


def mosaic_applies(m: int, n: int, k: int, g: int, q_dtype, codes=MOSAIC_CODES) -> bool:
  """Whether the gated Mosaic kernel takes (M, K) tokens against a (N = 2F, K) gate/up weight of
  `q_dtype` codes (one of `codes`) with G scale groups."""
  return n % 2 == 0 and q_dtype in codes and mosaic_gpu.supports_gated(m, n // 2, k, g)


def _rule(regime, platforms, preferred=None, codes=MOSAIC_AUTO_CODES):
  def when(p: Problem) -> bool:
    return mosaic_applies(p.m, p.n, p.k, p.g, p.codes, codes) and (
        preferred is None or preferred(p.m, p.n, p.k))
  return Rule(regime=regime, platforms=frozenset(platforms), when=when, implementation="mosaic")


def unpacked_preferred(p: Problem) -> bool:
  """Whether auto-dispatch on a Hopper GPU runs an int4 gate/up weight on a per-call int8 copy:
  from `UNPACKED_MIN_TOKENS` tokens (the prefix of a large batch), where the kernel takes it."""
  return (p.codes == jnp.int4 and p.m >= UNPACKED_MIN_TOKENS
          and mosaic_applies(p.m, p.n, p.k, p.g, jnp.int8))


UNPACKED = Rule(regime="Gated MLP on an int8 copy for long prefixes on Hopper",
                platforms=frozenset({HOPPER}), when=unpacked_preferred,
                implementation="mosaic_unpacked")
# Auto-dispatch: the fused kernel where the plain W4A8 kernel would run on the whole (2F, K)
# weight (one layer), or read it in place (a layer of a stack); the reference otherwise.
AUTO = (UNPACKED, _rule("Gated MLP on Hopper", {HOPPER}, mosaic_preferred))
AUTO_IN_PLACE = (UNPACKED,
                 _rule("Gated MLP in place on Hopper", {HOPPER}, mosaic_in_place_preferred))
MOSAIC = (_rule("Gated MLP where it applies", PLATFORMS, codes=MOSAIC_CODES),)
UNPACKED_TABLE = (Rule(regime="Gated MLP on an int8 copy where it applies",
                       platforms=PLATFORMS, implementation="mosaic_unpacked",
                       when=lambda p: mosaic_applies(p.m, p.n, p.k, p.g, jnp.int8)),)
TABLES = {(None, False): AUTO, (None, True): AUTO_IN_PLACE, ("mosaic", False): MOSAIC,
          ("mosaic", True): MOSAIC, ("mosaic_unpacked", False): UNPACKED_TABLE,
          ("mosaic_unpacked", True): UNPACKED_TABLE}


def gated_w4a8(xq: jax.Array, sx: jax.Array, zx: jax.Array | None, q: jax.Array, sw: jax.Array,
               zw: jax.Array | None, out_scale: jax.Array, out_zero: jax.Array | None, *,
               implementation: str | None = None, layer: jax.Array | None = None) -> jax.Array:
  """A gated MLP's hidden activation as int8 codes: quantize_static(gelu(gate) * up).

  Args:
    xq, sx, zx, q, sw, zw: as `w4a8.w4a8_matmul` (one layer, per-channel weight scales), q (2F, K)
      gate rows then up rows.
    out_scale, out_zero: the hidden activation's static quantizer, (1,) float32, or with `layer`
      (L, 1), one per layer of the stack (out_zero None: symmetric).
    implementation: None (auto), "xla" (the reference ops), "mosaic" (the kernel where it takes
      the shape, else the reference) or "mosaic_unpacked" (the same on a per-call int8 copy of
      the layer's codes).
    layer: None, or a traced int32 scalar: q, sw, zw are the stacked (L, 2F, K) / (L, 2F, 1)
      arrays of an `nn.scan` layer stack, and the kernel reads this layer in place; the reference
      takes a slice.

  Returns:
    (M, F) int8 codes.

  Raises:
    ValueError: an unknown implementation, or a layer index without stacked arrays.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"gated_w4a8 implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if layer is not None:
    dispatch.check_stacked(q, sw)
  m, k = xq.shape
  n, g = sw.shape[-2:]
  if out_scale.ndim == 2 and layer is None:
    raise ValueError(f"per-layer output scales {out_scale.shape} need a layer index")
  ref = lambda: reference(*one_layer(layer, xq, sx, zx, q, sw, zw, out_scale, out_zero))
  if implementation == "xla" or q.shape[-2:] != (n, k):
    return ref()
  choice = dispatch.choose(TABLES[implementation, layer is not None],
                           Problem(m=m, k=k, n=n, g=g, codes=q.dtype))
  if choice == "xla":
    return ref()
  if choice == "mosaic_unpacked":
    xq1, sx1, zx1, q1, *rest = one_layer(layer, xq, sx, zx, q, sw, zw, out_scale, out_zero)
    return dispatch.on_cuda(
        lambda: mosaic_gpu.gated_w4a8(xq1, sx1, zx1, q1.astype(jnp.int8), *rest), ref)
  return dispatch.on_cuda(
      lambda: mosaic_gpu.gated_w4a8(xq, sx, zx, q, sw, zw, out_scale, out_zero, layer=layer), ref)
