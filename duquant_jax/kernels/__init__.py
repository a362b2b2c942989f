"""W4A8 integer matmul kernels and their dispatch.

`w4a8_matmul` picks an implementation:
  None                auto: on a Hopper GPU (compute capability 9.x) the Mosaic GPU kernel where it
                      was measured to beat XLA's int8 path (`mosaic_preferred`); on other CUDA GPUs
                      the Triton kernel where it was measured to win (`kernel_preferred`); the XLA
                      integer path everywhere else (CPU, TPU, ROCm, and shapes no kernel takes);
  "xla"               `xla.w4a8_matmul` (int4 cast to int8 in the jitted function, TN int8 dot);
  "mosaic"            the Mosaic GPU kernel (`mosaic_gpu`) where it takes the shape on CUDA, else
                      the XLA path (so that one choice can be forced on a whole tree);
  "pallas"            the Pallas Triton kernel (CUDA GPUs);
  "pallas_interpret"  the same kernel in Pallas interpret mode (any backend; tests).

`transform_quantize` (DuQuant's online input transform, then per-token activation quantization)
runs as XLA ops. On CUDA it works on channel-major activations x^T
(`xla.transform_quantize_channel_major`): with at most `REDUCE_FORM_MAX_TOKENS` tokens and
`REDUCE_FORM_MAX_CHANNELS` channels the block rotations as multiply-reduce, beyond that as batched
GEMMs. Elsewhere it runs the row-major einsums (`InputTransform.apply`), then
`xla.quantize_per_token`. The fused Pallas kernel (`pallas_transform`) runs only when asked: on the
H100 it measured 2-60x slower than XLA's chain at every shape (BENCHMARKS.md, "Online transform").

`weight_only_matmul` (float activations times int4 / int8 codes, for weight-only linears) runs
`xla.weight_only_matmul`; the Pallas (Triton) weight-only kernel only when asked ("pallas"): on the
H100 it lost to XLA in the policy (docs/journal.md, session 7).

`w4a8_matmul(..., layer=i)` and `gated_w4a8(..., layer=i)` take the stacked (L, N, K) codes of an
`nn.scan` layer stack and a traced layer index: on Hopper the Mosaic kernels read that layer in
place (`mosaic_in_place_preferred`), on other CUDA GPUs the Pallas kernel for small M
(`stacked_preferred`); every other path slices it. `transform_only` is the online transform without
the quantizer, for weight-only linears behind DuQuant's rotations (same forms and dispatch).

Importing this package imports no GPU-only module: the Pallas modules are loaded when first traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from duquant_jax.kernels.xla import dequantize_per_token, quantize_per_token
from duquant_jax.kernels import xla

IMPLEMENTATIONS = (None, "xla", "xla_bf16", "mosaic", "pallas", "pallas_interpret")
TRANSFORM_IMPLEMENTATIONS = (None, "xla", "xla_reduce", "xla_cm", "xla_cm_reduce", "pallas",
                             "pallas_interpret")
# Auto-dispatch on CUDA uses the channel-major multiply-reduce transform up to this many tokens (M)
# and channels (K) per call, the channel-major einsum form beyond (H100, `bench_transform.py`:
# the einsum form won at K = 16384 from M = 51 and at every K from M = 6528).
REDUCE_FORM_MAX_TOKENS = 1024
REDUCE_FORM_MAX_CHANNELS = 8192


def kernel_preferred(m: int, n: int, k: int, g: int) -> bool:
  """Whether auto-dispatch uses the Pallas kernel on a CUDA GPU for an (M, K) x (N, K) matmul.

  From the H100 table in BENCHMARKS.md ("Kernels (H100)"): the kernel beat XLA's int8 path only where
  reading wide weights dominates: M <= 16 with N >= 8192 (gemma_2b gate/up), and 16 < M <= 64 with
  N >= K (q, o of gemma_2b, q and gate/up of gemma_300m). Elsewhere XLA's cuBLASLt path wins.
  """
  from duquant_jax.kernels import pallas_gpu
  if k % g:
    return False
  tiles = pallas_gpu.choose_tiles(m, n, k, k // g)
  if not pallas_gpu.supports(m, n, k, g, tiles):
    return False
  return (m <= 16 and n >= 8192) or (16 < m <= 64 and n >= k)


def w4a8_matmul(xq: jax.Array, sx: jax.Array, zx: jax.Array | None, q: jax.Array, sw: jax.Array,
                zw: jax.Array | None, *, out_dtype=jnp.float32,
                implementation: str | None = None, layer: jax.Array | None = None) -> jax.Array:
  """W4A8 matmul `dequant(xq) @ dequant(q).T`; see `xla.w4a8_matmul` for the exact arithmetic.

  Args:
    xq: (M, K) int8 activation codes; sx (M, 1) float32 scales; zx (M, 1) float32 zero points or None.
    q: (N, K) int4 weight codes stored (out, in); sw (N, G) float32 scales; zw (N, G) or None.
      With `layer`: the stacked (L, N, K) / (L, N, G) arrays of an `nn.scan` layer stack.
    out_dtype: dtype of the result.
    implementation: None (auto), "xla" (int8 dot), "xla_bf16" (the same integer dot on bf16
      tensor cores, bit-identical), "mosaic" (Hopper kernel where it takes the shape, else XLA),
      "pallas" or "pallas_interpret".
    layer: None, or a traced int32 scalar: which layer of the stacked arrays to use. The Mosaic
      and Pallas kernels read that layer in place; the other paths take a slice of it (which XLA
      copies when its consumer is a GEMM). Auto-dispatch reads in place on Hopper where
      `mosaic_in_place_preferred`, on other CUDA GPUs where `stacked_preferred`.

  Returns:
    (M, N) array of out_dtype.

  Raises:
    ValueError: unknown implementation. TypeError / ValueError: bad shapes or dtypes (kernel paths).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if layer is not None:
    return _at_layer(xq, sx, zx, q, sw, zw, layer, out_dtype, implementation)
  if implementation in ("xla", "xla_bf16"):
    return xla.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype,
                           dot="bf16" if implementation == "xla_bf16" else "int8")
  if implementation == "mosaic":
    return _mosaic_or_xla(xq, sx, zx, q, sw, zw, out_dtype)
  if implementation in ("pallas", "pallas_interpret"):
    from duquant_jax.kernels import pallas_gpu
    return pallas_gpu.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype,
                                  interpret=implementation == "pallas_interpret")
  return _auto(xq, sx, zx, q, sw, zw, out_dtype)


# Auto-dispatch reads a stacked weight in place (Pallas kernel, no slice copy) up to this many tokens.
STACKED_MAX_TOKENS = 64


def stacked_preferred(m: int, n: int, k: int, g: int, q_dtype) -> bool:
  """Whether auto-dispatch on CUDA runs a layer of a stacked weight with the Pallas kernel, which
  reads it in place, instead of slicing it (a per-layer copy of the codes and scales) for the
  unstacked dispatch: small M only (policy flow steps), where the copy costs as much as the
  matmul; and shapes the kernel takes."""
  from duquant_jax.kernels import pallas_gpu
  if m > STACKED_MAX_TOKENS or q_dtype != jnp.int4 or k % g:
    return False
  return pallas_gpu.supports(m, n, k, g, pallas_gpu.choose_tiles(m, n, k, k // g))


def _check_stacked(q: jax.Array, sw: jax.Array) -> None:
  """Refuses a layer index for codes / scales without exactly one stack axis."""
  if q.ndim != 3 or sw.ndim != 3:
    raise ValueError(f"a layer index needs stacked (L, N, K) codes and (L, N, G) scales, got "
                     f"{q.shape} and {sw.shape}")


def _at_layer(xq, sx, zx, q, sw, zw, layer, out_dtype, implementation):
  """`w4a8_matmul` on layer `layer` of stacked q, sw, zw."""
  _check_stacked(q, sw)
  from duquant_jax.kernels import pallas_gpu
  kernel = lambda interpret=False: pallas_gpu.w4a8_matmul(
      xq, sx, zx, q, sw, zw, out_dtype=out_dtype, interpret=interpret, layer=layer)
  if implementation in ("pallas", "pallas_interpret"):
    return kernel(interpret=implementation == "pallas_interpret")
  sliced = lambda: w4a8_matmul(xq, sx, zx, q[layer], sw[layer], None if zw is None else zw[layer],
                               out_dtype=out_dtype, implementation=implementation)
  m, k = xq.shape
  n, g = sw.shape[-2:]
  if mosaic_applies(m, n, k, g, q.dtype) and (implementation == "mosaic" or (
      implementation is None and _is_hopper() and mosaic_in_place_preferred(m, n, k))):
    from duquant_jax.kernels import mosaic_gpu
    in_place = lambda: mosaic_gpu.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype,
                                              layer=layer)
    return jax.lax.platform_dependent(cuda=in_place, default=sliced)
  if implementation is not None or not stacked_preferred(m, n, k, g, q.dtype):
    return sliced()
  return jax.lax.platform_dependent(cuda=kernel, default=sliced)


def weight_only_matmul(x: jax.Array, q: jax.Array, sw: jax.Array, zw: jax.Array | None, *,
                       out_dtype=jnp.float32, implementation: str | None = None,
                       layer: jax.Array | None = None) -> jax.Array:
  """Weight-only matmul `x @ dequant(q).T` for float x (M, K) and int4 / int8 codes q (N, K).

  Args:
    x: (M, K) float activations (the GEMM's input dtype).
    q, sw, zw: codes, scales (N, G) and zero points (or None); with `layer`, the stacked
      (L, N, K) / (L, N, G) arrays of an `nn.scan` layer stack.
    out_dtype: dtype of the result.
    implementation: "pallas" / "pallas_interpret" (the Pallas kernel), or None or any other name
      of `IMPLEMENTATIONS`: the XLA path (there is no int8 or Mosaic form of a weight-only matmul,
      and auto-dispatch never picks the kernel: in the policy on the H100 it measured slower than
      XLA's GEMM, in place or sliced; docs/journal.md, session 7).
    layer: None, or a traced int32 scalar: the layer of the stacked arrays to use (the kernel
      reads it in place; XLA gets a slice).

  Returns:
    (M, N) array of out_dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if layer is not None:
    _check_stacked(q, sw)
  if implementation in ("pallas", "pallas_interpret"):
    from duquant_jax.kernels import pallas_gpu
    return pallas_gpu.weight_only_matmul(x, q, sw, zw, out_dtype=out_dtype, layer=layer,
                                         interpret=implementation == "pallas_interpret")
  if layer is not None:
    q, sw, zw = q[layer], sw[layer], None if zw is None else zw[layer]
  return xla.weight_only_matmul(x, q, sw, zw).astype(out_dtype)


def mosaic_applies(m: int, n: int, k: int, g: int, q_dtype) -> bool:
  """Whether the Mosaic GPU kernel takes an (M, K) x (N, K) int4 matmul with G scale groups."""
  from duquant_jax.kernels import mosaic_gpu
  return q_dtype == jnp.int4 and mosaic_gpu.supports(m, n, k, g)


def mosaic_preferred(m: int, n: int, k: int) -> bool:
  """Whether auto-dispatch on a Hopper GPU uses the Mosaic kernel for an (M, K) x (N, K) matmul.

  From the H100 table in BENCHMARKS.md ("Mosaic GPU W4A8 kernel"), kernel vs XLA's int8 path:
  weights of >= 16M codes (gemma_2b gate/up/down) win at every M (1.05-1.8x); weights of >= 2M
  codes with N >= 1024 win from M = 64 on (0.97-1.7x); below that (k/v with N = 256, any weight at
  M < 64 but the largest) the kernel's fixed cost (~6 us, 2-3 small XLA ops around it) loses to
  XLA (0.44-0.95x).
  """
  return n * k >= 2**24 or (m >= 64 and n >= 1024 and n * k >= 2**21)


def mosaic_in_place_preferred(m: int, n: int, k: int) -> bool:
  """Whether auto-dispatch on a Hopper GPU runs a layer of a stacked weight with the Mosaic kernel,
  reading it in place: where the kernel is preferred anyway (`mosaic_preferred`), and for any
  weight of >= 2M codes, whose slice (a copy of >= 1 MB per layer and call, which XLA makes for
  its own GEMM too) costs more than the kernel's fixed cost saves."""
  return mosaic_preferred(m, n, k) or n * k >= 2**21


def _is_hopper() -> bool:
  """Whether the default device is an NVIDIA GPU of compute capability 9.x (trace-time fact)."""
  if jax.default_backend() != "gpu":
    return False
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def _mosaic_or_xla(xq, sx, zx, q, sw, zw, out_dtype):
  m, k = xq.shape
  n, g = sw.shape
  xla_fn = lambda: xla.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype)
  if q.shape != (n, k) or not mosaic_applies(m, n, k, g, q.dtype):
    return xla_fn()
  from duquant_jax.kernels import mosaic_gpu
  kernel_fn = lambda: mosaic_gpu.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype)
  return jax.lax.platform_dependent(cuda=kernel_fn, default=xla_fn)


def _auto(xq, sx, zx, q, sw, zw, out_dtype):
  """A kernel on CUDA where it wins by shape, XLA elsewhere; decided per platform at lowering."""
  m, k = xq.shape
  n, g = sw.shape
  xla_fn = lambda: xla.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype)
  if jax.default_backend() != "gpu" or q.shape != (n, k):
    return xla_fn()
  if _is_hopper():
    if mosaic_applies(m, n, k, g, q.dtype) and mosaic_preferred(m, n, k):
      return _mosaic_or_xla(xq, sx, zx, q, sw, zw, out_dtype)
    return xla_fn()
  if q.dtype != jnp.int4 or not kernel_preferred(m, n, k, g):
    return xla_fn()
  from duquant_jax.kernels import pallas_gpu
  kernel_fn = lambda: pallas_gpu.w4a8_matmul(xq, sx, zx, q, sw, zw, out_dtype=out_dtype)
  return jax.lax.platform_dependent(cuda=kernel_fn, default=xla_fn)


def gated_w4a8(xq: jax.Array, sx: jax.Array, zx: jax.Array | None, q: jax.Array, sw: jax.Array,
               zw: jax.Array | None, out_scale: jax.Array, out_zero: jax.Array | None, *,
               implementation: str | None = None, layer: jax.Array | None = None) -> jax.Array:
  """A gated MLP's hidden activation as int8 codes: quantize_static(gelu(gate) * up).

  gate, up = the two halves of the float32 W4A8 product `xla.w4a8_matmul(xq, sx, zx, q, sw, zw)`
  with q (2F, K) holding gate rows then up rows; the codes use the down projection's static
  scale and zero point (`out_scale`, `out_zero`, (1,) float32). On a Hopper GPU the Mosaic kernel
  computes this in one pass (`mosaic_gpu.gated_w4a8`: the (M, 2F) product stays in registers)
  where it takes the shape and the plain kernel would run (`mosaic_preferred`); elsewhere the same
  arithmetic runs as XLA ops (`mosaic_gpu.gated_reference`).

  Args:
    xq, sx, zx, q, sw, zw: as `w4a8_matmul` (one layer, per-channel weight scales).
    out_scale, out_zero: the hidden activation's static quantizer (out_zero None: symmetric).
    implementation: None (auto), "xla" (the reference ops) or "mosaic" (the kernel where it takes
      the shape, else the reference).
    layer: None, or a traced int32 scalar: q, sw, zw are the stacked (L, 2F, K) / (L, 2F, 1)
      arrays of an `nn.scan` layer stack, and the kernel reads this layer in place (auto-dispatch:
      where `mosaic_in_place_preferred`); the reference takes a slice.

  Returns:
    (M, F) int8 codes.
  """
  from duquant_jax.kernels import mosaic_gpu
  if implementation not in (None, "xla", "mosaic"):
    raise ValueError(f"gated_w4a8 implementation must be None, 'xla' or 'mosaic', got "
                     f"{implementation!r}")
  if layer is not None:
    _check_stacked(q, sw)
  m, k = xq.shape
  n, g = sw.shape[-2:]
  one = (lambda a: a) if layer is None else (lambda a: None if a is None else a[layer])
  ref = lambda: mosaic_gpu.gated_reference(xq, sx, zx, one(q), one(sw), one(zw), out_scale, out_zero)
  takes = (q.shape[-2:] == (n, k) and n % 2 == 0 and q.dtype == jnp.int4
           and mosaic_gpu.supports_gated(m, n // 2, k, g))
  if implementation == "xla" or not takes:
    return ref()
  preferred = mosaic_preferred if layer is None else mosaic_in_place_preferred
  if implementation is None and not (_is_hopper() and preferred(m, n, k)):
    return ref()
  kernel_fn = lambda: mosaic_gpu.gated_w4a8(xq, sx, zx, q, sw, zw, out_scale, out_zero,
                                            layer=layer)
  return jax.lax.platform_dependent(cuda=kernel_fn, default=ref)


def transform_quantize(x: jax.Array, transform, bits: int = 8, *, symmetric: bool = False,
                       clip_ratio: float = 1.0, implementation: str | None = None):
  """q8(transform.apply(x)) per token: (xq (M, K) int8, sx (M, 1) float32, zx (M, 1) or None).

  Args:
    x: (M, K) activations in any float dtype (one layer: the transform has no stack axes).
    transform: an `InputTransform` (smoothing merged into rot1 for the kernel) or None.
    bits, symmetric, clip_ratio: the per-token quantizer, as `xla.quantize_per_token`.
    implementation: None (auto: XLA; on CUDA channel-major, multiply-reduce for M <= 1024 and
      K <= 8192, else einsum; elsewhere the row-major einsum form), "xla" (the einsum
      form, `InputTransform.apply`), "xla_reduce" (`xla.transform_reduce`, no GEMMs), "xla_cm" /
      "xla_cm_reduce" (the same two forms on channel-major x^T,
      `xla.transform_quantize_channel_major`), "pallas" or
      "pallas_interpret" (the latter two raise if the kernel cannot take this transform).

  Returns:
    The per-token codes, scales and zero points of the transformed activations.
  """
  if implementation not in TRANSFORM_IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {TRANSFORM_IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  def xla_fn(form):
    one_layer = _one_layer(x, transform)
    if form in ("xla_cm", "xla_cm_reduce") and one_layer:
      return xla.transform_quantize_channel_major(x, transform, bits, symmetric=symmetric,
                                                  clip_ratio=clip_ratio,
                                                  reduce=form == "xla_cm_reduce")
    xt = x.astype(jnp.float32)
    if transform is not None:
      if form == "xla_reduce" and one_layer:
        xt = xla.transform_reduce(xt, transform)
      else:
        # HIGHEST: float32, not the GPU's default TF32 (which flips codes; BENCHMARKS.md).
        xt = transform.apply(xt, precision=jax.lax.Precision.HIGHEST)
    return quantize_per_token(xt, bits, symmetric=symmetric, clip_ratio=clip_ratio)

  if implementation in ("xla", "xla_reduce", "xla_cm", "xla_cm_reduce"):
    return xla_fn(implementation)
  if implementation is None:
    if transform is None:
      return xla_fn("xla")
    # Measured in the full policy on the H100 (docs/journal.md, session 5): channel-major forms
    # beat the row-major ones (pi0 batch 1: 51.5 vs 58.5 ms; batch 8: 204.5 vs 222.4 ms); the
    # multiply-reduce form wins up to ~1000 tokens, the einsum form at thousands. CPUs keep the
    # row-major einsum form.
    form = _cuda_form(x)
    return jax.lax.platform_dependent(cuda=lambda: xla_fn(form), default=lambda: xla_fn("xla"))
  if not fused_transform_applies(x.shape, transform):
    raise ValueError(f"the fused transform kernel does not take x {x.shape} with this transform "
                     "(needs rot1 with smoothing merged, no stack axes, power-of-two K and block)")
  from duquant_jax.kernels import pallas_transform

  return pallas_transform.transform_quantize(
      x, transform.rot1, transform.perm, transform.rot2, bits=bits, symmetric=symmetric,
      clip_ratio=clip_ratio, interpret=implementation == "pallas_interpret")


def transform_only(x: jax.Array, transform, *, implementation: str | None = None) -> jax.Array:
  """`transform.apply(x)` for a weight-only linear, in x's dtype (the GEMM's input precision).

  Args:
    x: (M, K) activations; transform: an `InputTransform` or None (x returned as is).
    implementation: as `transform_quantize`'s XLA forms ("pallas" is not offered here; None and
      "pallas*" run auto: channel-major on CUDA, the row-major einsum elsewhere).
  """
  if implementation not in TRANSFORM_IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {TRANSFORM_IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if transform is None:
    return x
  one_layer = _one_layer(x, transform)

  def form(name):
    if name in ("xla_cm", "xla_cm_reduce") and one_layer:
      return xla.transform_channel_major(x, transform, reduce=name == "xla_cm_reduce").astype(x.dtype)
    if name == "xla_reduce" and one_layer:
      return xla.transform_reduce(x, transform).astype(x.dtype)
    xt = transform.apply(x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return xt.astype(x.dtype)

  if implementation in ("xla", "xla_reduce", "xla_cm", "xla_cm_reduce"):
    return form(implementation)
  cm = _cuda_form(x)
  return jax.lax.platform_dependent(cuda=lambda: form(cm), default=lambda: form("xla"))


def _one_layer(x: jax.Array, transform) -> bool:
  """Whether x (M, K) and the transform are one layer's (no stack axes): the forms that need it."""
  return transform is not None and x.ndim == 2 and all(
      r is None or r.ndim == 3 for r in (transform.rot1, transform.rot2)) and (
          transform.perm is None or transform.perm.ndim == 1)


def _cuda_form(x: jax.Array) -> str:
  """Auto-dispatch's transform form on CUDA for x (..., M, K): channel-major multiply-reduce up to
  `REDUCE_FORM_MAX_TOKENS` x `REDUCE_FORM_MAX_CHANNELS`, the channel-major einsum beyond."""
  m, k = x.shape[-2:]
  return "xla_cm_reduce" if m <= REDUCE_FORM_MAX_TOKENS and k <= REDUCE_FORM_MAX_CHANNELS else "xla_cm"


def fused_transform_applies(x_shape, transform) -> bool:
  """Whether `pallas_transform` can run this transform on (M, K) activations."""
  from duquant_jax.kernels import pallas_transform
  if transform is None or transform.rot1 is None or transform.smooth is not None:
    return False
  if len(x_shape) != 2 or transform.rot1.ndim != 3:
    return False
  if transform.perm is not None and transform.perm.ndim != 1:
    return False
  if transform.rot2 is not None and transform.rot2.shape != transform.rot1.shape:
    return False
  k, b = x_shape[1], transform.rot1.shape[-1]
  return pallas_transform.supports(k, b)


__all__ = ["w4a8_matmul", "weight_only_matmul", "transform_quantize", "transform_only", "mosaic_applies", "mosaic_preferred", "mosaic_in_place_preferred", "TRANSFORM_IMPLEMENTATIONS", "fused_transform_applies", "quantize_per_token",
           "dequantize_per_token", "kernel_preferred", "stacked_preferred", "IMPLEMENTATIONS"]
