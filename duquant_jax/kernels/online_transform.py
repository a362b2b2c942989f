"""DuQuant's online input transform, then per-token activation quantization: its reference, its
forms and kernel, and its dispatch.

    xq, sx, zx = quantize_per_token(((x / smooth) R1)[perm] R2)

Implementations (`implementation=` of `transform_quantize`; `transform_only` takes the XLA forms):
  None            auto: lowered for CUDA, the first rule of `CUDA_FORMS` matching (M, K); lowered
                  for anything else, the reference;
  "xla"           the reference: the row-major einsum chain (`InputTransform.apply` at HIGHEST
                  precision), then `xla.quantize_per_token`;
  "xla_reduce"    the same with the block rotations as multiply-reduce (`xla.transform_reduce`);
  "xla_cm"        the einsum chain on channel-major x^T (`xla.transform_quantize_channel_major`);
  "xla_cm_reduce" the multiply-reduce form on x^T;
  "pallas"        one fused Pallas (Triton) kernel (`pallas_transform`), raising where it cannot
                  take the transform; "pallas_interpret" the same in interpret mode (tests).
The reduce and channel-major forms need one layer's x (M, K) and transform (no stack axes); with
stack axes they run the reference. The regimes: docs/kernels.md, "Transform + quantize".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from duquant_jax.kernels import dispatch, pallas_transform, xla
from duquant_jax.kernels.dispatch import PLATFORMS, Problem, Rule
from duquant_jax.kernels.xla import quantize_per_token

TRANSFORM_IMPLEMENTATIONS = (None, "xla", "xla_reduce", "xla_cm", "xla_cm_reduce", "pallas",
                             "pallas_interpret")
XLA_FORMS = ("xla", "xla_reduce", "xla_cm", "xla_cm_reduce")

# The channel-major multiply-reduce form up to this many tokens and channels per call, the
# channel-major einsum beyond (docs/kernels.md, "Transform + quantize").
REDUCE_FORM_MAX_TOKENS = 1024
REDUCE_FORM_MAX_CHANNELS = 8192

# Auto-dispatch's form where the trace is lowered for CUDA (on every device class: the choice is
# made at lowering); first match wins.
CUDA_FORMS = (
    Rule(regime="Channel-major multiply-reduce", platforms=PLATFORMS,
         when=lambda p: p.m <= REDUCE_FORM_MAX_TOKENS and p.k <= REDUCE_FORM_MAX_CHANNELS,
         implementation="xla_cm_reduce"),
    Rule(regime="Channel-major einsum", platforms=PLATFORMS, when=lambda p: True,
         implementation="xla_cm"),
)


def reference(x: jax.Array, transform, bits: int = 8, *, symmetric: bool = False,
              clip_ratio: float = 1.0):
  """The codes every form reproduces: `transform.apply(x)` in float32 (HIGHEST precision), then
  `xla.quantize_per_token`. Returns (xq (M, K) int8, sx (M, 1) float32, zx (M, 1) or None)."""
  xt = x.astype(jnp.float32)
  if transform is not None:
    # HIGHEST: the GPU's default float32 precision (TF32) flips codes.
    xt = transform.apply(xt, precision=jax.lax.Precision.HIGHEST)
  return quantize_per_token(xt, bits, symmetric=symmetric, clip_ratio=clip_ratio)


def _cuda_form(x: jax.Array) -> str:
  """The form auto-dispatch lowers for CUDA for x (..., M, K)."""
  m, k = x.shape[-2:]
  return dispatch.choose(CUDA_FORMS, Problem(m=m, k=k))


def transform_quantize(x: jax.Array, transform, bits: int = 8, *, symmetric: bool = False,
                       clip_ratio: float = 1.0, implementation: str | None = None):
  """q8(transform.apply(x)) per token: (xq (M, K) int8, sx (M, 1) float32, zx (M, 1) or None).

  Args:
    x: (M, K) activations in any float dtype (one layer: the transform has no stack axes).
    transform: an `InputTransform` (smoothing merged into rot1 for the kernel) or None.
    bits, symmetric, clip_ratio: the per-token quantizer, as `xla.quantize_per_token`.
    implementation: a name of `TRANSFORM_IMPLEMENTATIONS` (module docstring); None: auto.

  Returns:
    The per-token codes, scales and zero points of the transformed activations.

  Raises:
    ValueError: an unknown implementation, or "pallas*" with a transform the kernel cannot take.
  """
  if implementation not in TRANSFORM_IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {TRANSFORM_IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  quantizer = dict(symmetric=symmetric, clip_ratio=clip_ratio)

  def form(name):
    one_layer = _one_layer(x, transform)
    if name in ("xla_cm", "xla_cm_reduce") and one_layer:
      return xla.transform_quantize_channel_major(x, transform, bits,
                                                  reduce=name == "xla_cm_reduce", **quantizer)
    if name == "xla_reduce" and one_layer:
      return quantize_per_token(xla.transform_reduce(x.astype(jnp.float32), transform), bits,
                                **quantizer)
    return reference(x, transform, bits, **quantizer)

  if implementation in XLA_FORMS:
    return form(implementation)
  if implementation is None:
    if transform is None:
      return form("xla")
    cuda = _cuda_form(x)
    return dispatch.on_cuda(lambda: form(cuda), lambda: form("xla"))
  if not fused_transform_applies(x.shape, transform):
    raise ValueError(f"the fused transform kernel does not take x {x.shape} with this transform "
                     "(needs rot1 with smoothing merged, no stack axes, power-of-two K and block)")
  return pallas_transform.transform_quantize(
      x, transform.rot1, transform.perm, transform.rot2, bits=bits,
      interpret=implementation == "pallas_interpret", **quantizer)


def transform_only(x: jax.Array, transform, *, implementation: str | None = None) -> jax.Array:
  """`transform.apply(x)` for a weight-only linear, in x's dtype (the GEMM's input precision).

  Args:
    x: (M, K) activations; transform: an `InputTransform` or None (x returned as is).
    implementation: as `transform_quantize`'s XLA forms ("pallas" is not offered here; None and
      "pallas*" run auto: lowered for CUDA `CUDA_FORMS`, elsewhere the row-major einsum).

  Returns:
    The transformed activations, x's shape and dtype.

  Raises:
    ValueError: an unknown implementation.
  """
  if implementation not in TRANSFORM_IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {TRANSFORM_IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if transform is None:
    return x
  one_layer = _one_layer(x, transform)

  def form(name):
    if name in ("xla_cm", "xla_cm_reduce") and one_layer:
      xt = xla.transform_channel_major(x, transform, reduce=name == "xla_cm_reduce")
      return xt.astype(x.dtype)
    if name == "xla_reduce" and one_layer:
      return xla.transform_reduce(x, transform).astype(x.dtype)
    xt = transform.apply(x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return xt.astype(x.dtype)

  if implementation in XLA_FORMS:
    return form(implementation)
  cuda = _cuda_form(x)
  return dispatch.on_cuda(lambda: form(cuda), lambda: form("xla"))


def _one_layer(x: jax.Array, transform) -> bool:
  """Whether x (M, K) and the transform are one layer's (no stack axes): the forms that need it."""
  return transform is not None and x.ndim == 2 and all(
      r is None or r.ndim == 3 for r in (transform.rot1, transform.rot2)) and (
          transform.perm is None or transform.perm.ndim == 1)


def fused_transform_applies(x_shape, transform) -> bool:
  """Whether `pallas_transform` can run this transform on (M, K) activations."""
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
