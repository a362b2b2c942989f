"""The weight-only matmul `x @ dequant(q).T` (float activations, int4 / int8 codes): its reference,
its kernel and its dispatch.

Implementations: "pallas" / "pallas_interpret" run the Pallas (Triton) weight-only kernel
(`pallas_gpu.weight_only_matmul`, reading a stacked weight in place); None and every other name of
`w4a8.IMPLEMENTATIONS` (the packed weight's matmul choice) run the reference,
`xla.weight_only_matmul`, there being no int8 or Mosaic form of a weight-only matmul.
Auto-dispatch has no rule (`AUTO` is empty): the kernel lost to XLA's GEMM in the policy
(docs/kernels.md, "Weight-only matmul").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from duquant_jax.kernels import dispatch, pallas_gpu, xla
from duquant_jax.kernels.dispatch import Problem
from duquant_jax.kernels.w4a8 import IMPLEMENTATIONS

# Auto-dispatch: no kernel wins, the reference runs at every shape.
AUTO: tuple[dispatch.Rule, ...] = ()


def reference(x: jax.Array, q: jax.Array, sw: jax.Array, zw: jax.Array | None, *,
              out_dtype=jnp.float32, layer: jax.Array | None = None) -> jax.Array:
  """`xla.weight_only_matmul` in out_dtype, on layer `layer` of stacked arrays when given."""
  q, sw, zw = dispatch.at_layer(layer, q, sw, zw)
  return xla.weight_only_matmul(x, q, sw, zw).astype(out_dtype)


def _kernel(x, q, sw, zw, out_dtype, layer, interpret: bool = False):
  return pallas_gpu.weight_only_matmul(x, q, sw, zw, out_dtype=out_dtype, layer=layer,
                                       interpret=interpret)


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
      of `IMPLEMENTATIONS`: auto (`AUTO`, XLA at every shape).
    layer: None, or a traced int32 scalar: the layer of the stacked arrays to use (the kernel
      reads it in place; XLA gets a slice).

  Returns:
    (M, N) array of out_dtype.

  Raises:
    ValueError: an unknown implementation, or a layer index without stacked arrays.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if layer is not None:
    dispatch.check_stacked(q, sw)
  if implementation in ("pallas", "pallas_interpret"):
    return _kernel(x, q, sw, zw, out_dtype, layer, interpret=implementation == "pallas_interpret")
  ref = lambda: reference(x, q, sw, zw, out_dtype=out_dtype, layer=layer)
  m, k = x.shape
  n, g = sw.shape[-2:]
  choice = dispatch.choose(AUTO, Problem(m=m, k=k, n=n, g=g, codes=q.dtype))
  if choice == "xla":
    return ref()
  return dispatch.on_cuda(lambda: _kernel(x, q, sw, zw, out_dtype, layer), ref)
