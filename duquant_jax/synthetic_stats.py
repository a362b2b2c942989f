"""Synthetic calibration statistics, for timing the packer where calibration cannot run.

Benchmarks of `quantize_params` on full-size models with random weights (no forward pass on a CPU)
need stats of the right shapes: activation rows with a few outlier channels, as calibration of a real
model would give. These stats carry no information about the weights; never use them to judge
accuracy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from duquant_jax.layouts import linear_layouts


class SyntheticStats:
  """`absmax` (stack..., K) and `samples` (stack..., R, K) per linear, sharing inputs like the model."""

  def __init__(self, absmax, samples):
    self.absmax, self.samples = absmax, samples


def synthetic_stats(params, select: str = r"PaliGemma/llm/layers/.*", *, rows: int = 64,
                    seed: int = 0) -> dict[str, SyntheticStats]:
  """Gaussian activation rows (R = `rows`) with 3 outlier channels 50x larger, per selected linear."""
  import re
  out = {}
  for path, lay in linear_layouts(params).items():
    if not re.fullmatch(select, path):
      continue
    key = jax.random.fold_in(jax.random.key(seed), len(out))
    shape = lay.stack_shape + (rows, lay.in_features)
    x = jax.random.normal(key, shape, jnp.float32)
    x = x.at[..., :3].multiply(50.0)
    out[path] = SyntheticStats(jnp.max(jnp.abs(x), axis=-2), x)
  return out
