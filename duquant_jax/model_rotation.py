"""Orthogonal rotations folded into an openpi-layout param tree: exact in float, free at run time.

QuaRot (Ashkboos et al., NeurIPS 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs") and
SpinQuant use the computational invariance of a pre-norm transformer: RMSNorm without its scale
commutes with any orthogonal Q (rms(r Q) = rms(r)), so rotating the residual stream r -> r Q changes
no output once every weight writing into the stream absorbs Q and every weight reading a norm's
output absorbs Q^T (and the norm's (1 + scale)). The linears that read the stream (q / kv,
gate / up) then see rotated inputs, whose outlier channels and massive-activation tokens are spread
over all channels, with no online transform. The attention values get the same treatment per
layer: attention is linear in V, so V -> V R per head makes the output projection's input z R,
which its weight absorbs as R^T.

Axes (openpi's legend): L layers, N query heads, K kv heads, H head dim, D width, F MLP hidden,
V vocabulary, A action dim.

| rotated with Q (per expert) | weight, axis rotated            | role                            |
|-----------------------------|---------------------------------|---------------------------------|
| embedder/input_embedding    | (V, D), D                       | writes the LLM stream           |
| img/head kernel, bias       | (1152, D), D                    | writes the LLM stream (images)  |
| state_proj, action_time_mlp_out kernel, bias | (., D), D      | write pi0's expert stream       |
| attn_vec_einsum{sfx}        | (L, N, H, D), D                 | writes (attention output)       |
| mlp{sfx}/linear             | (L, F, D), D                    | writes (MLP output)             |
| q_einsum{sfx}, kv_einsum{sfx}, mlp{sfx}/gating_einsum | D, after x (1 + pre-norm scale) | read |
| action_out_proj kernel      | (D, A), D, after x (1 + final_norm_1 scale) | reads pi0's expert |

Q is a randomized Hadamard matrix diag(s) H / sqrt(D) (s random signs; D a power of 2), applied by
a fast Walsh-Hadamard transform in O(D log D) per row: the 257152 x 2048 token table takes
seconds. Experts with pi0.5's adaptive RMSNorm are not rotated: their per-token scale and shift
do not commute with Q. The LLM's final norm output (which pi0 and pi0.5 never read) comes out
rotated. The value rotation R (L, H, H) is Haar-random from the batched QR of Gaussians, shared
by every expert's V (each expert's output projection reads every expert's values).

Calibration statistics of the rotated inputs follow from the unrotated ones' sample rows
(`rotate_stats`), so statistics from the original model stay valid input to `quantize_params`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax import openpi_paths
from duquant_jax.gptq import densify
from duquant_jax.openpi_paths import FINAL_READERS, STREAM_WRITERS, final_norm, stream_readers
from duquant_jax.rotations import random_orthogonal
from duquant_jax.treepath import copy_dicts as _copy_dicts
from duquant_jax.treepath import get_path as _get
from duquant_jax.treepath import has_path as _has
from duquant_jax.treepath import set_path as _set

Params = dict[str, Any]

LAYERS = openpi_paths.GEMMA_LAYERS
# The paths come from `duquant_jax.openpi_paths`: weights writing into each expert's residual
# stream outside the layers (`STREAM_WRITERS`, rotated on their last axis, with their bias),
# weights reading an expert's final norm (`FINAL_READERS`, rotated on their first axis, after its
# scale), and inside the layers the norms with the linears reading them (`stream_readers`) and the
# linears writing the stream (`openpi_paths.stream_writers`).
# Rows of the token table rotated per jitted call (bounds the float32 working set).
_TABLE_CHUNK_ROWS = 16384


@dataclasses.dataclass(frozen=True)
class Rotations:
  """What `rotate_residual` folded in: the sign vectors of each rotated expert's Hadamard Q
  ({suffix: (D,) float32 +-1}) and the value rotations R (L, H, H), for `rotate_stats`."""

  residual_signs: dict[str, jax.Array]
  values: Optional[jax.Array]


def walsh_hadamard(x: jax.Array, axis: int = -1) -> jax.Array:
  """x times the normalized Sylvester Hadamard matrix H / sqrt(n) along `axis` (n a power of 2).

  H is symmetric and orthogonal once normalized, so this is its own inverse. log2(n) butterfly
  passes, in x's dtype promoted to at least float32.

  Raises:
    ValueError: the axis length is not a power of 2.
  """
  n = x.shape[axis]
  if n < 1 or n & (n - 1):
    raise ValueError(f"walsh_hadamard: axis length {n} is not a power of 2")
  x = jnp.moveaxis(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis, -1)
  lead = x.shape[:-1]
  h = 1
  while h < n:
    y = x.reshape(*lead, n // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
    h *= 2
  return jnp.moveaxis(x / np.sqrt(n).astype(np.float32), -1, axis)


def _rotate_axis(w: jax.Array, signs: jax.Array, axis: int) -> jax.Array:
  """w with Q = diag(signs) H / sqrt(D) applied along `axis`: a writer's w Q (axis = its output)
  and a reader's Q^T w (axis = its input) are the same operation, H being symmetric."""
  shape = [1] * w.ndim
  shape[axis] = -1
  return walsh_hadamard(w.astype(jnp.float32) * signs.reshape(shape), axis)


_rotate_axis_jit = jax.jit(_rotate_axis, static_argnames="axis")


def _float_leaf(out: Params, path: str):
  old = _get(out, path)
  if not hasattr(old, "dtype") or not jnp.issubdtype(old.dtype, jnp.floating):
    raise ValueError(f"{path}: rotate_residual needs a float array here, got {type(old).__name__}")
  return old


def _update(out: Params, path: str, fn) -> None:
  """out[path] = fn(float32 array), stored back in the leaf's own dtype."""
  old = _float_leaf(out, path)
  _set(out, path, fn(jnp.asarray(old, jnp.float32)).astype(old.dtype))


def _update_layers(out: Params, path: str, fn) -> None:
  """out[path][l] = fn(float32 layer l, l) for a layer-stacked (L, ...) leaf, one layer at a time
  (a float32 copy of a whole stack is gigabytes at full size), in the leaf's own dtype."""
  old = _float_leaf(out, path)
  _set(out, path, jnp.stack([fn(jnp.asarray(old[l], jnp.float32), l).astype(old.dtype)
                             for l in range(old.shape[0])]))


def _rotate_table(table: jax.Array, signs: jax.Array) -> jax.Array:
  """(V, D) token table times Q, row chunk by row chunk (a float32 copy of it all is 2 GiB)."""
  parts = [_rotate_axis_jit(table[i:i + _TABLE_CHUNK_ROWS], signs, axis=1).astype(table.dtype)
           for i in range(0, table.shape[0], _TABLE_CHUNK_ROWS)]
  return jnp.concatenate(parts, axis=0)


def rotated_experts(params: Params) -> list[str]:
  """Suffixes ('' the LLM, '_1' the action expert) of the experts whose stream can be rotated:
  those with plain RMSNorms (`pre_attention_norm{sfx}/scale`)."""
  _get(params, LAYERS)  # KeyError naming it where the tree has no Gemma layers
  return [sfx for sfx in openpi_paths.EXPERTS
          if all(_has(params, f"{norm}/scale") for norm, _ in stream_readers(sfx))]


def rotated_readers(params: Params) -> set[str]:
  """The norms (paths) whose outputs `rotate_residual` rotates: the input groups of the linears
  that read a rotated stream."""
  return {norm for sfx in rotated_experts(params) for norm, _ in stream_readers(sfx)}


def rotate_residual(params: Params, *, key: jax.Array) -> tuple[Params, Rotations]:
  """The same function as `params` (exact in float), with rotated residual streams and values.

  Args:
    params: an openpi-layout pi0 / pi0.5 param tree of float arrays (the model's `params`).
    key: PRNG key of the random signs and value rotations (the same key, the same result).

  Returns:
    (rotated params, in each leaf's dtype; the `Rotations` applied). `params` is not modified.

  Raises:
    ValueError: not an openpi-layout tree, a width that is not a power of 2, a missing or
      non-float weight that the rotation must rewrite.
  """
  if not _has(params, LAYERS):
    raise ValueError(f"rotate_residual: no {LAYERS} in these params (not an openpi-layout tree)")
  out = _copy_dicts(params)
  signs = {}
  k_res, k_val = jax.random.split(key)
  for i, sfx in enumerate(rotated_experts(params)):
    d = _get(params, f"{stream_readers(sfx)[0][0]}/scale").shape[-1]
    if d & (d - 1):
      raise ValueError(f"rotate_residual: width {d} of expert '{sfx}' is not a power of 2")
    s = jnp.where(jax.random.bernoulli(jax.random.fold_in(k_res, i), 0.5, (d,)), 1.0, -1.0)
    signs[sfx] = s
    for path in STREAM_WRITERS[sfx]:
      if not _has(out, path):
        raise ValueError(f"rotate_residual: {path} (writes expert '{sfx}''s stream) is missing")
      if path.endswith("input_embedding"):
        _set(out, path, _rotate_table(_get(out, path), s))
      else:
        _update(out, path, lambda w: _rotate_axis_jit(w, s, axis=-1))
    for path, axis in openpi_paths.stream_writers(sfx):  # attn_vec (L, N, H, D), linear (L, F, D)
      _update_layers(out, path, lambda w, l, a=axis: _rotate_axis_jit(w, s, axis=a))
    # Readers: x (1 + scale) w  ->  (x Q) Q^T diag(1 + scale) w; the norm keeps scale 0.
    for norm, readers in stream_readers(sfx):
      g = 1.0 + jnp.asarray(_get(out, f"{norm}/scale"), jnp.float32)  # (L, D)
      for path, axis in readers:
        shape = [1] * (_get(out, path).ndim - 1)
        shape[axis] = d
        _update_layers(out, path, lambda w, l, a=axis, sh=tuple(shape): _rotate_axis_jit(
            w * g[l].reshape(sh), s, axis=a))
      _update(out, f"{norm}/scale", jnp.zeros_like)
    final = f"{final_norm(sfx)}/scale"
    if FINAL_READERS[sfx]:
      g = 1.0 + jnp.asarray(_get(out, final), jnp.float32)
      for path in FINAL_READERS[sfx]:
        _update(out, path, lambda w: _rotate_axis_jit(w * g[:, None], s, axis=0))
      _update(out, final, jnp.zeros_like)

  values = _rotate_values(out, k_val)
  return out, Rotations(residual_signs=signs, values=values)


def _value_paths(params: Params) -> tuple[list[str], list[str]]:
  """The (kv_einsum, attn_vec_einsum) weight paths of every Gemma expert, each sorted."""
  paths = [f"{LAYERS}/attn/{k}/w" for k in _get(params, LAYERS)["attn"]]
  of = lambda name: sorted(p for p in paths if (m := openpi_paths.match(p)) and m[0].name == name)
  return of("kv"), of("attn_vec")


def _rotate_values(out: Params, key: jax.Array) -> Optional[jax.Array]:
  """V -> V R and the output projections' inputs -> R^T, per layer, in place; returns R (L, H, H)."""
  kv_paths, vec_paths = _value_paths(out)
  if not kv_paths:
    return None
  depth, head_dim = _get(out, kv_paths[0]).shape[0], _get(out, kv_paths[0]).shape[-1]
  r = random_orthogonal(key, (depth, head_dim, head_dim))
  hi = jax.lax.Precision.HIGHEST
  for path in kv_paths:  # (L, 2, K, D, H): index 1 of axis 1 is V
    _update_layers(out, path, lambda w, l: w.at[1].set(
        jnp.einsum("kdh,hg->kdg", w[1], r[l], precision=hi)))
  for path in vec_paths:  # (L, N, H, D)
    _update_layers(out, path, lambda w, l: jnp.einsum("hg,nhd->ngd", r[l], w, precision=hi))
  return r


# ----------------------------------------------------------------------------------------------
# Calibration statistics of the rotated model's inputs.


@dataclasses.dataclass(frozen=True)
class SampleStats:
  """What `quantize_params` reads of a linear's input statistics: `absmax` (stack..., K),
  `samples` (stack..., R, K) calibration rows and, for GPTQ, `hessian` (stack..., 1, K, K)."""

  absmax: jax.Array
  samples: jax.Array
  hessian: Optional[jax.Array] = None


def rotate_stats(stats: Any, params: Params, rotations: Rotations) -> Optional[dict]:
  """Statistics of the rotated model's linear inputs, from those of the unrotated `params`.

  The readers of a rotated stream see (x / (1 + scale)) Q where they saw x; the output
  projections see z R per head where they saw z; every other input is unchanged. Sample rows are
  mapped exactly; absmax of a changed input is the max over its mapped rows.

  Args:
    stats: a mapping (or `CalibStats`) from weight path to stats with `absmax` and `samples`, or None.
    params: the UNROTATED params the stats were taken on (for the norm scales).
    rotations: what `rotate_residual` applied.

  Returns:
    {weight path: stats}, with `SampleStats` where the input changed; None for None.
  """
  if stats is None:
    return None
  layers = getattr(stats, "layers", stats)
  out = dict(layers.items())
  kv_paths, vec_paths = _value_paths(params)
  for sfx, s in sorted(rotations.residual_signs.items()):
    # (norm path, [weight paths]); a stacked norm scale (L, D) meets rows (L, R, D), the final
    # norm's (D,) rows (R, D).
    norms = [(norm, [p for p, _ in readers]) for norm, readers in stream_readers(sfx)]
    if FINAL_READERS[sfx]:
      norms.append((final_norm(sfx), list(FINAL_READERS[sfx])))
    for norm, paths in norms:
      g = 1.0 + jnp.asarray(_get(params, f"{norm}/scale"), jnp.float32)
      g = g[:, None, :] if g.ndim == 2 else g
      for path in paths:
        if path in out:
          f = lambda x, g=g, s=s: walsh_hadamard(x / g * s, -1)
          out[path] = _sample_stats(f(jnp.asarray(out[path].samples, jnp.float32)),
                                    _map_hessian(getattr(out[path], "hessian", None), f))
  if rotations.values is not None:
    r = rotations.values
    for path in vec_paths:
      if path in out:
        def f(x, r=r):  # (L, R, N * H), (N, H) order
          lay, rows, k = x.shape
          h = r.shape[-1]
          return jnp.einsum("lrnh,lhg->lrng", x.reshape(lay, rows, k // h, h), r,
                            precision=jax.lax.Precision.HIGHEST).reshape(lay, rows, k)
        out[path] = _sample_stats(f(jnp.asarray(out[path].samples, jnp.float32)),
                                  _map_hessian(getattr(out[path], "hessian", None), f))
  return out


def _sample_stats(x: jax.Array, hessian: Optional[jax.Array] = None) -> SampleStats:
  return SampleStats(absmax=jnp.max(jnp.abs(x), axis=-2), samples=x, hessian=hessian)


def _map_hessian(h: Optional[jax.Array], f) -> Optional[jax.Array]:
  """The Hessian (stack..., NB, HB, HB) of x M from that of x, for a linear row map f(x) = x M:
  M^T H M = f(f(H)^T)^T, made dense -> (stack..., 1, K, K)."""
  if h is None:
    return None
  dense = densify(h) if h.ndim == 3 else jax.vmap(densify)(h)
  m = f(jnp.swapaxes(f(dense), -1, -2))
  return (0.5 * (m + jnp.swapaxes(m, -1, -2)))[..., None, :, :]
