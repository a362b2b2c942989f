"""The W4A8 matmul `dequant(xq) @ dequant(q).T`: its reference, its kernels and its dispatch.

Implementations (`implementation=` of `w4a8_matmul`):
  None                auto: the first rule of `AUTO` (one layer) or `AUTO_IN_PLACE` (a layer of a
                      stack) that matches the platform and the shape, else XLA;
  "xla"               `xla.w4a8_matmul`, the reference: int4 cast to int8 in the jitted function,
                      a TN int8 dot, a float32 epilogue;
  "xla_bf16"          the same integer dot on bf16 tensor cores (bit-identical);
  "xla_unpacked"      the same integer dot on an int8 copy of the weight codes made first, so that
                      the GEMM library's int8 kernel runs (bit-identical; long prefixes on Hopper);
  "mosaic"            the Hopper kernel (`mosaic_gpu`) where it takes the shape and the trace is
                      lowered for CUDA, else XLA (so that one choice can be forced on a whole tree);
  "pallas"            the Triton kernel (`pallas_gpu`, CUDA GPUs);
  "pallas_interpret"  the same kernel in Pallas interpret mode (any backend; tests).

With `layer=`, q, sw, zw are the stacked (L, N, K) / (L, N, G) arrays of an `nn.scan` layer stack
and `layer` a traced index: the kernels read that layer in place, the XLA path takes a slice.
Auto-dispatch runs a kernel only where the trace is lowered for CUDA (`dispatch.on_cuda`). The
regimes and the measurements behind their thresholds: docs/kernels.md, "W4A8 matmul".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from duquant_jax.kernels import dispatch, mosaic_gpu, pallas_gpu, xla
from duquant_jax.kernels.dispatch import HOPPER, OTHER_GPU, PLATFORMS, Problem, Rule

IMPLEMENTATIONS = (None, "xla", "xla_bf16", "xla_unpacked", "mosaic", "pallas", "pallas_interpret")
_XLA_DOTS = {"xla": "int8", "xla_bf16": "bf16", "xla_unpacked": "int8_unpacked"}

# Thresholds of the regimes (docs/kernels.md, "W4A8 matmul").
# Hopper: from this many tokens the GEMM library's int8 kernel on an unpacked int8 copy of the
# weight beats the Mosaic kernel (the copy's bytes are small against the GEMM's work).
UNPACKED_MIN_TOKENS = 4096
# Mosaic (Hopper): weights of at least this many codes at every M ...
MOSAIC_ANY_TOKENS_MIN_CODES = 2**24
# ... smaller ones from this many tokens, with at least this many output channels and codes.
MOSAIC_MIN_TOKENS = 64
MOSAIC_MIN_N = 1024
MOSAIC_MIN_CODES = 2**21
# A layer of a stacked weight of at least this many codes is read in place by the Mosaic kernel.
MOSAIC_IN_PLACE_MIN_CODES = 2**21
# Pallas (other CUDA GPUs): up to this many tokens for weights at least this wide ...
PALLAS_WIDE_MAX_TOKENS = 16
PALLAS_WIDE_MIN_N = 8192
# ... and up to this many tokens for weights with N >= K.
PALLAS_MAX_TOKENS = 64
# A layer of a stacked weight is read in place by the Pallas kernel up to this many tokens.
STACKED_MAX_TOKENS = 64


def reference(xq: jax.Array, sx: jax.Array, zx: jax.Array | None, q: jax.Array, sw: jax.Array,
              zw: jax.Array | None, *, out_dtype=jnp.float32,
              layer: jax.Array | None = None) -> jax.Array:
  """The W4A8 arithmetic every implementation reproduces: `xla.w4a8_matmul` (exact integer dots,
  float32 epilogue), on layer `layer` of stacked arrays when given."""
  q, sw, zw = dispatch.at_layer(layer, q, sw, zw)
  sx, zx = dispatch.act_at_layer(layer, sx, zx)
  return xla.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype)


# Weight codes the Mosaic kernels take, and those auto-dispatch gives them: int8 weights (W8A8)
# run the same kernel without the int4 upcast, by request (`implementation="mosaic"`) until the
# GPU has measured them.
MOSAIC_CODES = (jnp.int4, jnp.int8)
MOSAIC_AUTO_CODES = (jnp.int4,)


def mosaic_applies(m: int, n: int, k: int, g: int, q_dtype, codes=MOSAIC_CODES) -> bool:
  """Whether the Mosaic GPU kernel takes an (M, K) x (N, K) matmul of `q_dtype` codes (one of
  `codes`) with G scale groups."""
  return q_dtype in codes and mosaic_gpu.supports(m, n, k, g)


def mosaic_preferred(m: int, n: int, k: int) -> bool:
  """Whether auto-dispatch on a Hopper GPU uses the Mosaic kernel for an (M, K) x (N, K) matmul:
  the largest weights at any M; weights of `MOSAIC_MIN_CODES` codes and `MOSAIC_MIN_N` outputs
  from `MOSAIC_MIN_TOKENS` tokens. Below that the kernel's fixed cost loses to XLA."""
  return n * k >= MOSAIC_ANY_TOKENS_MIN_CODES or (
      m >= MOSAIC_MIN_TOKENS and n >= MOSAIC_MIN_N and n * k >= MOSAIC_MIN_CODES)


def mosaic_in_place_preferred(m: int, n: int, k: int) -> bool:
  """Whether auto-dispatch on a Hopper GPU runs a layer of a stacked weight with the Mosaic kernel,
  reading it in place: where the kernel is preferred anyway (`mosaic_preferred`), and for any
  weight of `MOSAIC_IN_PLACE_MIN_CODES` codes, whose slice (a copy per layer and call, which XLA
  makes for its own GEMM too) costs more than the kernel's fixed cost."""
  return mosaic_preferred(m, n, k) or n * k >= MOSAIC_IN_PLACE_MIN_CODES


def _pallas_takes(m: int, n: int, k: int, g: int) -> bool:
  """Whether the Pallas kernel takes the shape with its automatic tiles."""
  if k % g:
    return False
  return pallas_gpu.supports(m, n, k, g, pallas_gpu.choose_tiles(m, n, k, k // g))


def kernel_preferred(m: int, n: int, k: int, g: int) -> bool:
  """Whether auto-dispatch on a CUDA GPU other than Hopper uses the Pallas kernel for an
  (M, K) x (N, K) matmul: where reading wide weights dominates (up to `PALLAS_WIDE_MAX_TOKENS`
  tokens with N >= `PALLAS_WIDE_MIN_N`; up to `PALLAS_MAX_TOKENS` with N >= K) and the kernel
  takes the shape."""
  if not _pallas_takes(m, n, k, g):
    return False
  return (m <= PALLAS_WIDE_MAX_TOKENS and n >= PALLAS_WIDE_MIN_N) or (
      PALLAS_WIDE_MAX_TOKENS < m <= PALLAS_MAX_TOKENS and n >= k)


def stacked_preferred(m: int, n: int, k: int, g: int, q_dtype) -> bool:
  """Whether auto-dispatch runs a layer of a stacked int4 weight with the Pallas kernel, which
  reads it in place, instead of slicing it: up to `STACKED_MAX_TOKENS` tokens (policy flow steps),
  where the slice copy costs as much as the matmul, and shapes the kernel takes."""
  if m > STACKED_MAX_TOKENS or q_dtype != jnp.int4:
    return False
  return _pallas_takes(m, n, k, g)


def _mosaic_rule(regime, platforms, preferred=None, codes=MOSAIC_AUTO_CODES):
  """A rule running the Mosaic kernel where it takes the shape and codes (and
  `preferred(m, n, k)` holds)."""
  def when(p: Problem) -> bool:
    return mosaic_applies(p.m, p.n, p.k, p.g, p.codes, codes) and (
        preferred is None or preferred(p.m, p.n, p.k))
  return Rule(regime=regime, platforms=frozenset(platforms), when=when, implementation="mosaic")


def unpacked_preferred(p: Problem) -> bool:
  """Whether auto-dispatch on a Hopper GPU runs an int4 matmul with per-channel scales as XLA's
  int8 GEMM on an unpacked copy of the weight: from `UNPACKED_MIN_TOKENS` tokens (the prefix of
  a large batch). Grouped scales keep their batched dot (not measured unpacked)."""
  return p.codes == jnp.int4 and p.g == 1 and p.m >= UNPACKED_MIN_TOKENS


UNPACKED = Rule(regime="Unpacked int8 GEMM for long prefixes on Hopper",
                platforms=frozenset({HOPPER}), when=unpacked_preferred,
                implementation="xla_unpacked")
# Auto-dispatch of one layer's matmul; first match wins, XLA otherwise.
AUTO = (
    UNPACKED,
    _mosaic_rule("Mosaic on Hopper", {HOPPER}, mosaic_preferred),
    Rule(regime="Pallas on other CUDA GPUs", platforms=frozenset({OTHER_GPU}),
         when=lambda p: p.codes == jnp.int4 and kernel_preferred(p.m, p.n, p.k, p.g),
         implementation="pallas"),
)
# Auto-dispatch of a layer of a stacked weight: a kernel reading it in place, or XLA on a slice.
AUTO_IN_PLACE = (
    UNPACKED,
    _mosaic_rule("Mosaic in place on Hopper", {HOPPER}, mosaic_in_place_preferred),
    Rule(regime="Pallas in place", platforms=PLATFORMS,
         when=lambda p: stacked_preferred(p.m, p.n, p.k, p.g, p.codes), implementation="pallas"),
)
# implementation="mosaic": the kernel wherever it takes the shape (one layer or in place).
MOSAIC = (_mosaic_rule("Mosaic where it applies", PLATFORMS, codes=MOSAIC_CODES),)
TABLES = {None: AUTO, "mosaic": MOSAIC}
IN_PLACE_TABLES = {None: AUTO_IN_PLACE, "mosaic": MOSAIC}


def _kernel(name: str, xq, sx, zx, q, sw, zw, out_dtype, layer, interpret: bool = False):
  """Runs backend kernel `name` ("mosaic" or "pallas")."""
  if name == "mosaic":
    return mosaic_gpu.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype, layer=layer)
  sx, zx = dispatch.per_token(layer, sx, zx, xq.shape[0])  # the Triton kernel's form
  return pallas_gpu.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype, interpret=interpret,
                                layer=layer)


def w4a8_matmul(xq: jax.Array, sx: jax.Array, zx: jax.Array | None, q: jax.Array, sw: jax.Array,
                zw: jax.Array | None, *, out_dtype=jnp.float32,
                implementation: str | None = None, layer: jax.Array | None = None) -> jax.Array:
  """W4A8 matmul `dequant(xq) @ dequant(q).T`; see `xla.w4a8_matmul` for the exact arithmetic.

  Args:
    xq: (M, K) int8 activation codes; sx (M, 1) float32 scales per token, or (1, 1) per
      tensor (a static quantizer), or with `layer` (L, 1, 1), one per layer of the stack (the
      Mosaic kernels read it in place); zx the same form of zero points, or None.
    q: (N, K) int4 weight codes stored (out, in); sw (N, G) float32 scales; zw (N, G) or None.
      With `layer`: the stacked (L, N, K) / (L, N, G) arrays of an `nn.scan` layer stack.
    out_dtype: dtype of the result.
    implementation: a name of `IMPLEMENTATIONS` (module docstring); None: auto.
    layer: None, or a traced int32 scalar: which layer of the stacked arrays to use. The Mosaic
      and Pallas kernels read that layer in place; the other paths take a slice of it (which XLA
      copies when its consumer is a GEMM).

  Returns:
    (M, N) array of out_dtype.

  Raises:
    ValueError: unknown implementation. TypeError / ValueError: bad shapes or dtypes (kernel paths).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if layer is not None:
    return _at_layer(xq, sx, zx, q, sw, zw, layer, out_dtype, implementation)
  dispatch.act_at_layer(None, sx, zx)  # per-layer scales without a layer: the error names them
  if implementation in _XLA_DOTS:
    return xla.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype,
                           dot=_XLA_DOTS[implementation])
  if implementation in ("pallas", "pallas_interpret"):
    return _kernel("pallas", xq, sx, zx, q, sw, zw, out_dtype, None,
                   interpret=implementation == "pallas_interpret")
  m, k = xq.shape
  n, g = sw.shape
  fallback = lambda: reference(xq, sx, zx, q, sw, zw, out_dtype=out_dtype)
  if q.shape != (n, k):  # the reference names the mismatch
    return fallback()
  choice = dispatch.choose(TABLES[implementation], Problem(m=m, k=k, n=n, g=g, codes=q.dtype))
  if choice == "xla":
    return fallback()
  if choice in _XLA_DOTS:
    return dispatch.on_cuda(lambda: w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype,
                                                implementation=choice), fallback)
  return dispatch.on_cuda(lambda: _kernel(choice, xq, sx, zx, q, sw, zw, out_dtype, None),
                          fallback)


def _at_layer(xq, sx, zx, q, sw, zw, layer, out_dtype, implementation):
  """`w4a8_matmul` on layer `layer` of stacked q, sw, zw: a kernel reading it in place, or the
  same implementation on a slice."""
  dispatch.check_stacked(q, sw)
  if implementation in ("pallas", "pallas_interpret"):
    return _kernel("pallas", xq, sx, zx, q, sw, zw, out_dtype, layer,
                   interpret=implementation == "pallas_interpret")
  sliced = lambda impl=implementation: w4a8_matmul(
      xq, *dispatch.act_at_layer(layer, sx, zx), *dispatch.at_layer(layer, q, sw, zw),
      out_dtype=out_dtype, implementation=impl)
  if implementation not in IN_PLACE_TABLES:
    return sliced()
  m, k = xq.shape
  n, g = sw.shape[-2:]
  choice = dispatch.choose(IN_PLACE_TABLES[implementation],
                           Problem(m=m, k=k, n=n, g=g, codes=q.dtype))
  if choice == "xla":
    return sliced()
  if choice in _XLA_DOTS:
    return dispatch.on_cuda(lambda: sliced(choice), sliced)
  return dispatch.on_cuda(lambda: _kernel(choice, xq, sx, zx, q, sw, zw, out_dtype, layer), sliced)
