"""Running packed param trees: in our pi0 model, and in any flax module.

Our openpi-layout model needs nothing: its einsums go through `models.gemma.linear`, which calls a
packed weight's own `einsum`, and `Policy.sample_actions` installs the Dense hook below. For other
flax modules, put packed leaves where the float kernels were and apply the module under
`packed_interceptor` (flax `nn.intercept_methods`): `Dense` and `DenseGeneral` calls whose kernel is
packed run the W4A8 matmul at trace time, everything else is untouched.

Example:
  packed = quantize_params(params, cfg, stats)
  y = quantized_apply(module, {"params": packed}, x)          # any flax module
  actions = jax.jit(policy.sample_actions)(packed, obs, rng)  # the pi0 policy
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from duquant_jax.models.gemma import packed_dense_interceptor

packed_interceptor = packed_dense_interceptor


def quantized_apply(module: nn.Module, variables: Any, *args, **kwargs):
  """`module.apply(variables, ...)` with packed Dense / DenseGeneral kernels run quantized."""
  with nn.intercept_methods(packed_interceptor):
    return module.apply(variables, *args, **kwargs)
