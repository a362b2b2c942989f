"""Synthetic calibration statistics, for timing the packer where calibration cannot run.

Benchmarks of `quantize_params` on full-size models with random weights (no forward pass on a CPU)
need stats of the right shapes: activation rows with a few outlier channels, as calibration of a real
model would give. These stats carry no information about the weights; never use them to judge
accuracy.
"""

from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp

from duquant_jax.gptq import hessian_block_for
from duquant_jax.layouts import linear_layouts


class SyntheticStats:
  """`absmax` (stack..., K) and `samples` (stack..., R, K) per linear, sharing inputs like the model,
  and for GPTQ rules `hessian` (stack..., NB, HB, HB): X^T X of the samples in diagonal blocks of at
  most `HESSIAN_BLOCK` channels, computed when read (as `calibrate` keeps it)."""

  def __init__(self, absmax, samples):
    self.absmax, self.samples = absmax, samples

  @property
  def hessian(self):
    k = self.samples.shape[-1]
    hb = hessian_block_for(k, HESSIAN_BLOCK)
    x = self.samples.reshape(*self.samples.shape[:-1], k // hb, hb)
    return jnp.einsum("...RBI,...RBJ->...BIJ", x, x)


HESSIAN_BLOCK = 2048  # as `CalibConfig.hessian_block`


def synthetic_stats(params, select: str | None = None, *, rows: int = 64,
                    seed: int = 0) -> dict[str, SyntheticStats]:
  """Gaussian activation rows (R = `rows`) with 3 outlier channels 50x larger, per selected linear.

  Args:
    params: a param tree (arrays or ShapeDtypeStructs; under `jax.eval_shape` the stats are abstract).
    select: regex (re.fullmatch) on the weight path, or None for every declared linear (so that any
      preset, including ones quantizing SigLIP, finds stats for its smoothing and greedy rotations).
    rows: R, activation rows per linear. seed: the same seed gives the same stats.

  Returns:
    {weight path: SyntheticStats with absmax (stack..., K) and samples (stack..., R, K)}.
  """
  out = {}
  for path, lay in linear_layouts(params).items():
    if select is not None and not re.fullmatch(select, path):
      continue
    # Keyed by the path, so a layer's stats do not depend on which other layers are selected.
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)
    shape = lay.stack_shape + (rows, lay.in_features)
    x = jax.random.normal(key, shape, jnp.float32)
    x = x.at[..., :3].multiply(50.0)
    out[path] = SyntheticStats(jnp.max(jnp.abs(x), axis=-2), x)
  return out
