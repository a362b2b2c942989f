"""Running packed param trees: in our pi0 model, and in any flax module.

Our openpi-layout model needs nothing: its einsums go through `models.gemma.linear`, which calls a
packed weight's own `einsum`, and `Policy.sample_actions` installs the Dense hook below. For other
flax modules, put packed leaves where the float kernels were and apply the module under
`packed_interceptor` (flax `nn.intercept_methods`): `Dense` and `DenseGeneral` calls whose kernel is
packed run the W4A8 matmul at trace time, everything else is untouched. Flax NNX modules run
packed trees through `duquant_jax.nnx_models.quantized_nnx_apply`.

Which kernels run is chosen per call by platform and shape (`duquant_jax.kernels`);
`with_implementations` overrides that for a whole tree, e.g. to force the XLA path on a GPU.

Example:
  packed = quantize_params(params, cfg, stats)
  y = quantized_apply(module, {"params": packed}, x)          # any flax module
  actions = jax.jit(policy.sample_actions)(packed, obs, rng)  # the pi0 policy
  xla_only = with_implementations(packed, matmul="xla", transform="xla")
"""

from __future__ import annotations

import functools

from typing import Any

import flax.linen as nn
import jax

from duquant_jax import kernels
from duquant_jax.models.gemma import packed_dense_interceptor
from duquant_jax.packed import PackedLinear

packed_interceptor = packed_dense_interceptor


def quantized_apply(module: nn.Module, variables: Any, *args, **kwargs):
  """`module.apply(variables, ...)` with packed Dense / DenseGeneral kernels run quantized (kernels of
  one input group that read the same input quantize it once per call)."""
  with nn.intercept_methods(functools.partial(packed_interceptor, memo={})):
    return module.apply(variables, *args, **kwargs)


def with_implementations(tree: Any, *, matmul: str | None = None,
                         transform: str | None = None) -> Any:
  """The tree with every `PackedLinear`'s kernel choice set; arrays are shared, nothing is copied.

  Args:
    tree: a packed param tree (or any pytree holding PackedLinear leaves).
    matmul: one of `kernels.IMPLEMENTATIONS` (None: auto by platform and shape).
    transform: one of `kernels.TRANSFORM_IMPLEMENTATIONS` (None: auto).

  Returns:
    The same tree with `matmul_impl` / `transform_impl` replaced on every packed weight.

  Raises:
    ValueError: an unknown implementation name.
  """
  if matmul not in kernels.IMPLEMENTATIONS:
    raise ValueError(f"matmul implementation must be one of {kernels.IMPLEMENTATIONS}, "
                     f"got {matmul!r}")
  if transform not in kernels.TRANSFORM_IMPLEMENTATIONS:
    raise ValueError(f"transform implementation must be one of "
                     f"{kernels.TRANSFORM_IMPLEMENTATIONS}, got {transform!r}")
  return jax.tree.map(
      lambda n: n.replace(matmul_impl=matmul, transform_impl=transform)
      if isinstance(n, PackedLinear) else n,
      tree, is_leaf=lambda n: isinstance(n, PackedLinear))
