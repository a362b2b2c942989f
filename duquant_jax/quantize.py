"""`quantize_params`: DuQuant W4A8 as a pure pytree transform of an openpi-layout param tree.

For each group of linears that read the same input (q / kv after one RMSNorm; gate / up are one
weight), following DuQuant (Lin et al., "DuQuant: Distributing Outliers via Dual Transformation Makes
Stronger Quantized LLMs", NeurIPS 2024) with the corrections of DESIGN.md section 3:
  1. smoothing lam = max|x|^a / max|W|^(1-a) from calibration stats; 1/lam is folded into the
     preceding RMSNorm scale (pi0.5's adaptive norm: its scale and shift modulation; SigLIP: the
     LayerNorm), otherwise merged into the online rotation;
  2. block rotation R1 (greedy, activation-aware, orthogonal factors from `jnp.linalg.qr`), zigzag
     permutation, block rotation R2, all batched over layers and blocks;
  3. the weight W' = T^T diag(lam) W is quantized per output channel / head / group to int4,
     symmetric or asymmetric, with a per-channel clip searched to minimise output MSE on the
     transformed calibration activations; the codes are then rounded to nearest or, where the
     rule asks (`rounding="gptq"`), by GPTQ against the Hessian of the transformed input
     (`duquant_jax.gptq`);
  4. the result is a `PackedLinear` at the weight's path; activations are quantized per token to
     int8 at run time.
Token embedding tables matching an `EmbeddingRule` become `PackedEmbedding`s (weight-only, row-wise;
`duquant_jax.embedding`): a gather needs no input transform.
Everything is deterministic in (params, cfg, stats): rotation keys derive from `cfg.seed` and the
layer path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from duquant_jax.config import LayerRule, QuantConfig, match_rules
from duquant_jax.embedding import PackedEmbedding, quantize_embedding
from duquant_jax.gptq import gptq_codes, transform_hessian
from duquant_jax.kernels import xla
from duquant_jax.layouts import LinearLayout, embedding_paths, linear_layouts, to_2d_perm
from duquant_jax.model_rotation import rotate_residual, rotate_stats, rotated_readers
from duquant_jax.packed import PackedLinear, dequantize_weight, tree_nbytes
from duquant_jax.transforms import (InputTransform, block_inverse, build_duquant_transform,
                                    check_block_alignment, random_block_rotation, rotate_output,
                                    smoothing_factors)
from duquant_jax.treepath import copy_dicts as _copy_dicts
from duquant_jax.treepath import get_path as _get
from duquant_jax.treepath import set_path as _set

Params = dict[str, Any]
# Fields of a rule that define the input transform; linears sharing an input must agree on them.
_TRANSFORM_FIELDS = ("block_size", "rotation", "permutation", "rotation_steps", "smooth_alpha")
# Members of one input group that quantize activations must agree on these too (one quantized
# input serves them all).
_QUANTIZER_FIELDS = ("act_scale", "act_percentile")
# Float32 bytes of weight rows per block of the clip search (cache-sized; `quantize_weight`).
_ROW_BLOCK_BYTES = 1 << 21


# ----------------------------------------------------------------------------------------------
# Weight quantization.


def _qrange(bits: int, symmetric: bool) -> tuple[int, int]:
  if symmetric:
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _tile_range(w: jax.Array, *, symmetric: bool, rows: int, cols: int):
  """Per-tile (lo, hi) of w (N, K) over tiles of `rows` outputs x `cols` inputs: (N // rows, G) each.

  Symmetric tiles get (-max|w|, max|w|); asymmetric ones include 0 in the range.
  """
  n, k = w.shape
  t = w.reshape(n // rows, rows, k // cols, cols)
  if symmetric:
    amax = jnp.max(jnp.abs(t), axis=(1, 3))
    return -amax, amax
  return jnp.minimum(jnp.min(t, axis=(1, 3)), 0.0), jnp.maximum(jnp.max(t, axis=(1, 3)), 0.0)


def _tile_quantize(w: jax.Array, lo: jax.Array, hi: jax.Array, clip: jax.Array, *, bits: int,
                   symmetric: bool, rows: int):
  """Quantizes w (N, K) given tile ranges lo / hi and clip ratios, all (N // rows, G).

  Returns codes (N, K) float (integer-valued), scale (N, G), zero (N, G) or None.
  """
  n, k = w.shape
  g = lo.shape[-1]
  qmin, qmax = _qrange(bits, symmetric)
  if symmetric:
    scale = jnp.maximum(hi * clip, 1e-10) / qmax
    zero = None
  else:
    scale = jnp.maximum((hi - lo) * clip, 1e-10) / (qmax - qmin)
    zero = jnp.round(qmin - lo * clip / scale)
  scale = jnp.repeat(scale, rows, axis=0)
  q = jnp.round(w.reshape(n, g, k // g) / scale[..., None])
  if zero is not None:
    zero = jnp.repeat(zero, rows, axis=0)
    q = q + zero[..., None]
  return jnp.clip(q, qmin, qmax).reshape(n, k), scale, zero


def _row_block(n: int, k: int, rows: int) -> int:
  """Output rows per block of the clip search: a multiple of the scale tile's rows dividing N,
  about `_ROW_BLOCK_BYTES` of float32."""
  target = max(rows, _ROW_BLOCK_BYTES // (4 * k))
  best = rows
  for rb in range(rows, min(n, target) + 1, rows):
    if n % rb == 0:
      best = rb
  return best


def quantize_weight(w: jax.Array, x: Optional[jax.Array], *, bits: int, symmetric: bool,
                    rows: int, cols: int, clip_grid: tuple[float, ...]):
  """Quantizes one weight w (N, K) (stored out x in), searching the clip ratio per tile.

  The search keeps only the best clip ratio per tile; the weight is quantized once at the end.

  Args:
    w: (N, K) float32 weight, transposed 2-D view.
    x: (R, K) activations in the same (transformed) basis, or None (then the search minimises the
      weight MSE). Rows of zeros are ignored by the objective.
    bits: weight bits; symmetric: no zero point; rows / cols: the scale tile (rows = 1 per channel,
      head_dim per head; cols = K, or the group size).
    clip_grid: clip ratios to try; (1.0,) is plain round-to-nearest.

  Returns:
    codes (N, K) int8 (values in the `bits` range), scale (N, G) float32, zero (N, G) float32 or None.
  """
  # Tiles are independent: search a block of output rows at a time (`lax.map`), so every candidate's
  # error lives in cache instead of N x K float32 temporaries per candidate (2.8x faster on a CPU
  # for gemma_2b's gate / up, BENCHMARKS.md).
  n, k = w.shape
  rb = _row_block(n, k, rows)
  if rb < n:
    one = functools.partial(_quantize_rows, x=x, bits=bits, symmetric=symmetric, rows=rows,
                            cols=cols, clip_grid=clip_grid)
    codes, scale, zero = jax.lax.map(one, w.reshape(n // rb, rb, k))
    return (codes.reshape(n, k), scale.reshape(n, -1),
            None if zero is None else zero.reshape(n, -1))
  return _quantize_rows(w, x=x, bits=bits, symmetric=symmetric, rows=rows, cols=cols,
                        clip_grid=clip_grid)


def _quantize_rows(w, *, x, bits, symmetric, rows, cols, clip_grid):
  """`quantize_weight` on a block of whole tiles (rows divisible by `rows`)."""
  n, k = w.shape
  g = k // cols
  lo, hi = _tile_range(w, symmetric=symmetric, rows=rows, cols=cols)
  quant = functools.partial(_tile_quantize, w, lo, hi, bits=bits, symmetric=symmetric, rows=rows)

  def tile_error(clip):
    err = w - dequantize_weight(*quant(jnp.full(lo.shape, clip, jnp.float32)))
    # Output MSE ||X e_n||^2 summed over the tile; per group the diagonal of X^T X weights it.
    if x is None:
      per = jnp.sum(err.reshape(n, g, cols) ** 2, axis=-1)
    elif g == 1:
      per = jnp.sum((err @ x.T) ** 2, axis=-1, keepdims=True)
    else:
      h = jnp.mean(x * x, axis=0).reshape(g, cols)
      per = jnp.sum(err.reshape(n, g, cols) ** 2 * h, axis=-1)
    return per.reshape(n // rows, rows, g).sum(axis=1)  # (N // rows, G)

  best_clip = jnp.full(lo.shape, clip_grid[0], jnp.float32)
  if len(clip_grid) > 1:
    best_err = tile_error(clip_grid[0])
    for c in clip_grid[1:]:  # a handful of static candidates; only (N // rows, G) state is kept
      e = tile_error(c)
      best_clip = jnp.where(e < best_err, c, best_clip)
      best_err = jnp.minimum(e, best_err)
  codes, scale, zero = quant(best_clip)
  return codes.astype(jnp.int8), scale.astype(jnp.float32), zero


# ----------------------------------------------------------------------------------------------
# Helpers over layouts.


def to_2d(w: jax.Array, layout: LinearLayout) -> jax.Array:
  """One layer's weight (as in the param tree, no stack axes) -> W2 (K, N) float32."""
  perm = to_2d_perm(layout.w_spec, layout.contract_letters)
  return jnp.transpose(w, perm).reshape(layout.in_features, layout.out_features).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="layout")
def _w_absmax_one(w: jax.Array, layout: LinearLayout) -> jax.Array:
  """max |W| over the output axes of one layer, in the weight's own layout and dtype (exact), then
  ordered as `to_2d` orders the input channels: (K,) float32."""
  spec, contract = layout.w_spec, layout.contract_letters
  m = jnp.max(jnp.abs(w), axis=tuple(i for i, c in enumerate(spec) if c not in contract))
  kept = sorted(contract, key=spec.index)  # m's axes: the contraction axes in weight order
  m = jnp.transpose(m, tuple(kept.index(c) for c in contract))
  return m.reshape(layout.in_features).astype(jnp.float32)


def _w_absmax_in(w: Any, layout: LinearLayout) -> jax.Array:
  """Per-input-channel max |W| (stack..., K), one stacked layer at a time (a float32 copy of a
  whole stacked weight can be gigabytes)."""
  if not layout.num_stack:
    return _w_absmax_one(_on_device(w), layout)
  return jnp.stack([_w_absmax_one(_on_device(w[i]), layout) for i in range(w.shape[0])])


def _on_device(a: Any) -> jax.Array:
  """A jax array of `a`. Host arrays go through `jax.device_put`, which on the CPU aliases a
  64-byte aligned numpy buffer instead of copying it (`jnp.asarray` always copies): the packer
  reads each stacked layer of a host weight without a fresh copy (and its page faults)."""
  return a if isinstance(a, jax.Array) else jax.device_put(np.asarray(a))


def _weight_array(w: Any) -> Any:
  """A weight as `quantize_params` works on it: jax arrays as they are (on their device); host
  arrays and lazily read leaves (`openpi_checkpoint.LazyLeaf`) as host numpy arrays, which the
  packer moves to the device one stacked layer at a time."""
  return w if isinstance(w, jax.Array) else np.asarray(w)


def _shape_key(layout: LinearLayout) -> LinearLayout:
  """The layout without its path, so weights of equal shape and use share compiled programs."""
  return dataclasses.replace(layout, path="", norm=None, producer=None, shared=None)


def _layer_key(seed: int, path: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _stats_for(stats, path: str):
  if stats is None:
    return None
  layers = getattr(stats, "layers", stats)
  return layers.get(path) if isinstance(layers, Mapping) else None


def _check_finite(name: str, x) -> None:
  if isinstance(x, jax.core.Tracer):  # abstract evaluation (jax.eval_shape for byte accounting)
    return
  # On the host, one stacked layer at a time: one device program per check would cost more than the
  # check, and a float32 copy of a whole stacked weight can be gigabytes.
  x = np.asarray(x)
  # bfloat16 / float16 are checked as they are (ml_dtypes' isfinite), without a float32 copy.
  cast = not jnp.issubdtype(x.dtype, jnp.floating)
  for part in (x if x.ndim >= 3 else (x,)):
    if not np.isfinite(np.asarray(part, np.float32) if cast else part).all():
      raise ValueError(f"{name}: contains NaN or Inf")


# ----------------------------------------------------------------------------------------------
# Smoothing folds into the preceding norm.


def _fold_into_norm(params: Params, layout: LinearLayout, lam: jax.Array) -> None:
  """Divides the norm's output by lam (stack..., K) in place of an online division.

  Computed in float32; each folded leaf is stored back in its original dtype, so a bf16 model stays
  bf16 (pi0.5's adaptive-norm Dense kernels would otherwise double to float32: 0.21 GiB).
  """
  norm = layout.norm

  def get(path):
    return jnp.asarray(_get(params, path), jnp.float32)

  def put(path, value):
    _set(params, path, value.astype(_get(params, path).dtype))

  if layout.norm_kind == "rms":  # y = n * (1 + s)  ->  n * (1 + s) / lam
    put(f"{norm}/scale", (1.0 + get(f"{norm}/scale")) / lam - 1.0)
  elif layout.norm_kind == "layernorm":
    for leaf in ("scale", "bias"):
      put(f"{norm}/{leaf}", get(f"{norm}/{leaf}") / lam)
  elif layout.norm_kind == "adarms":  # y = n * (1 + scale) + shift, with (scale, shift, gate) = Dense
    d = lam.shape[-1]
    kern = get(f"{norm}/Dense_0/kernel")
    bias = get(f"{norm}/Dense_0/bias")
    inv = 1.0 / lam
    kern = jnp.concatenate([kern[..., :2 * d] * jnp.concatenate([inv, inv], -1)[..., None, :],
                            kern[..., 2 * d:]], axis=-1)
    bias = jnp.concatenate([(1.0 + bias[..., :d]) * inv - 1.0, bias[..., d:2 * d] * inv,
                            bias[..., 2 * d:]], axis=-1)
    put(f"{norm}/Dense_0/kernel", kern)
    put(f"{norm}/Dense_0/bias", bias)
  else:
    raise AssertionError(layout.norm_kind)


def _fold_into_producer(params: Params, layout: LinearLayout, lam: jax.Array) -> None:
  """Divides the input of Gemma's down projection by lam (stack..., F) through the up half of the
  producing `gating_einsum` (stack..., 2, D, F): gelu(gate) * (up / lam), exact."""
  path = layout.producer
  w = _get(params, path)
  if not hasattr(w, "dtype"):
    raise ValueError(f"{layout.path}: its smoothing folds into {path}, which is already packed")
  w32 = jnp.asarray(w, jnp.float32)
  w32 = w32.at[..., 1, :, :].divide(lam[..., None, :])
  _set(params, path, w32.astype(w.dtype))


def _static_range(samples, transform, rule: LayerRule, path: str):
  """(act_scale, act_zero) (stack..., 1) of a static activation quantizer, from the calibration
  rows as the quantizer will see them (after the whole input transform)."""
  if samples is None:
    raise ValueError(f"{path}: act_scale='static' needs calibration stats (sample rows) for this "
                     "layer; pass stats from duquant_jax.calibrate")
  x = samples if transform is None else transform.apply(samples, precision=jax.lax.Precision.HIGHEST)
  scale, zero = xla.static_range(x, rule.act_bits, symmetric=rule.act_symmetric,
                                 percentile=rule.act_percentile)
  _check_finite(f"{path}: static activation scale", scale)
  return scale, zero


# ----------------------------------------------------------------------------------------------
# Packing one weight (all its stacked layers).


def _scale_tile(rule: LayerRule, layout: LinearLayout) -> tuple[int, int]:
  k = layout.in_features
  if rule.weight_granularity == "channel" or rule.weight_bits is None:
    return 1, k
  if rule.weight_granularity == "head":
    if layout.head_role != "out":
      raise ValueError(f"{layout.path}: per-head weight scales need head-structured outputs "
                       "(q/k/v projections); use 'channel' or 'group' here")
    return layout.head_dim, k
  if k % rule.group_size:
    raise ValueError(f"{layout.path}: group_size {rule.group_size} does not divide the input "
                     f"width K={k}")
  return 1, rule.group_size


@functools.partial(jax.jit, static_argnames=("layout", "rule", "rows", "cols"))
def _pack_one(w_l, t_l, r_l, x_l, h_l, *, layout, rule, rows, cols):
  """Folds the transform into one layer's weight and quantizes it: codes (N, K) (int4 up to 4 bits,
  else int8), scale, zero. `h_l` (NB, HB, HB): the untransformed input's Hessian, for GPTQ."""
  w2 = to_2d(w_l, layout)
  x2 = None
  if t_l is not None:
    w2 = t_l.fold(w2)
    x2 = None if x_l is None else t_l.apply(x_l, precision=jax.lax.Precision.HIGHEST)
  elif x_l is not None:
    x2 = x_l
  if r_l is not None:
    # restore() multiplies by the stored R^T; fold its exact inverse (R^T)^{-1} = (R^{-1})^T.
    w2 = rotate_output(w2, jnp.swapaxes(block_inverse(r_l), -1, -2))
  if rule.weight_bits is None:  # transforms only: the folded float weight, scale 1
    return w2.T, jnp.ones((w2.shape[1], 1), jnp.float32), None
  # The output MSE is the same in the rotated output basis (the rotation is orthogonal).
  clip_grid = rule.clip_grid if rule.clip_search else (1.0,)
  codes, scale, zero = quantize_weight(w2.T, x2, bits=rule.weight_bits,
                                       symmetric=rule.weight_symmetric, rows=rows, cols=cols,
                                       clip_grid=clip_grid)
  if h_l is not None:
    # GPTQ keeps the scales the clip search chose and re-chooses the codes, in the basis they live
    # in: the Hessian of the transformed input x M is M^T H M. (The output rotation acts on rows,
    # which GPTQ treats independently.)
    if t_l is not None:
      apply = functools.partial(t_l.apply, precision=jax.lax.Precision.HIGHEST)
      h_l = transform_hessian(h_l, apply, h_l.shape[0])
    qmin, qmax = _qrange(rule.weight_bits, rule.weight_symmetric)
    codes = gptq_codes(w2.T, h_l, scale, zero, qmin=qmin, qmax=qmax, damp=rule.gptq_damp,
                       block=rule.gptq_block)
  return codes.astype(_codes_dtype(rule.weight_bits)), scale, zero


class _Cancelled(Exception):
  """The packing thread stopped because `quantize_params` failed or was interrupted."""


def _pack_layers(w, transform, out_rot, samples, hessian, *, layout, rule, rows, cols,
                 cancelled: Callable[[], bool] = lambda: False):
  """`_pack_one` on every stacked layer of w: (codes (stack..., N, K), scale, zero).

  A Python loop over the stack, one jitted call per layer: the float32 working set is one layer's
  (a whole-stack program let XLA keep float32 copies of the stack: gigabytes at full size), and
  `w` may be a host array, read a layer at a time. `hessian` (stack..., NB, HB, HB) of the
  untransformed input, for `rule.rounding == "gptq"`, else None. `cancelled()` is asked before
  each layer (`_Cancelled` is raised once it is true).
  """
  ns = layout.num_stack
  pack = functools.partial(_pack_one, layout=layout, rule=rule, rows=rows, cols=cols)
  if ns == 0:
    return pack(_on_device(w), transform, out_rot, samples, hessian)
  if ns != 1:
    raise NotImplementedError(f"weights with {ns} stack axes ({layout.shape}) are not supported")
  take = lambda t, i: None if t is None else jax.tree.map(lambda a: a[i], t)

  def layer(i):
    if cancelled():
      raise _Cancelled
    return pack(_on_device(w[i]), take(transform, i), take(out_rot, i), take(samples, i),
                take(hessian, i))

  outs = [layer(i) for i in range(layout.shape[0])]
  return tuple(None if parts[0] is None else jnp.stack(parts) for parts in zip(*outs))


def _checked_hessian(hessian, layout: LinearLayout) -> jax.Array:
  """The stats' Hessian (stack..., NB, HB, HB) as float32, checked against the layout."""
  if hessian is None:
    raise ValueError(f"{layout.path}: rounding='gptq' needs the input Hessian in the calibration "
                     "stats; calibrate with CalibConfig(hessian=calibrate.hessian_for(cfg, params))")
  hessian = jnp.asarray(hessian, jnp.float32)
  k = layout.in_features
  ok = (hessian.ndim == layout.num_stack + 3 and hessian.shape[:-3] == layout.stack_shape
        and hessian.shape[-1] == hessian.shape[-2] and hessian.shape[-3] * hessian.shape[-1] == k)
  if not ok:
    raise ValueError(f"{layout.path}: Hessian of shape {hessian.shape} does not match the input "
                     f"(expected {layout.stack_shape} + (NB, HB, HB) with NB * HB = K = {k})")
  _check_finite(f"{layout.path}: Hessian", hessian)
  return hessian


def _codes_dtype(bits: Optional[int]):
  if bits is None:  # transforms only: float weights
    return jnp.float32
  return jnp.int4 if bits <= 4 else jnp.int8


def _output_rotation(rule: LayerRule, layout: LinearLayout, key) -> Optional[jax.Array]:
  if rule.output_rotation == "off":
    return None
  n = layout.out_features
  if n % rule.block_size:
    raise ValueError(f"{layout.path}: block size {rule.block_size} does not divide the output width "
                     f"N={n} for the output rotation")
  if layout.head_role == "out":
    check_block_alignment(rule.block_size, layout.head_dim, f"{layout.path} (output rotation)")
  rot = random_block_rotation(jax.random.fold_in(key, 7), layout.stack_shape, n, rule.block_size)
  return rot.astype(jnp.float16)


# ----------------------------------------------------------------------------------------------
# The transform.


def quantize_params(params: Params, cfg: QuantConfig, stats: Any = None, *,
                    progress: bool = False) -> Params:
  """Maps an openpi-layout param tree to a packed one (pure: `params` is not modified).

  Args:
    params: the model's param tree (the dict holding 'PaliGemma', ...), float arrays.
    cfg: the rules; linears matching no rule (or a skip rule) stay in floating point.
    stats: calibration statistics (`duquant_jax.calibrate.CalibStats`, or a mapping from weight path
      to an object with `absmax` (stack..., K) and `samples` (stack..., R, K)). Needed for smoothing
      and the greedy rotation; optional for activation-free choices (RTN, random / Hadamard rotations).
    progress: show a progress bar over the groups of linears (for the CLI).

  Returns:
    A tree of the same structure where each quantized weight is a `PackedLinear` and norms carry the
    folded smoothing. Run it with `Policy(cfg, runtime=PackedRuntime()).sample_actions` (or any
    flax module via `duquant_jax.runtime.quantized_apply`).

  Groups of linears reading one input are packed in order; each group's stacked layers are packed
  (one jitted call per layer) in a background thread while this thread reads the next group's
  weights and builds its transform, so at most two groups' weights are held at once. The result
  does not depend on that overlap (the same programs on the same inputs).

  Token embedding tables matching one of `cfg.embeddings` become `PackedEmbedding`s. With
  `cfg.rotate_residual` the float model is first rotated (`rotated_model`; the returned tree's
  float leaves are the rotated ones) and `stats` are mapped to its inputs; linears reading a
  rotated stream are not smoothed. Rules with `act_scale="static"` get static activation scales
  from the calibration rows (`PackedLinear.act_scale`).

  Raises:
    ValueError: NaN/Inf weights or stats, missing stats where needed, block sizes that do not divide
      the width or head_dim, rules that disagree on a shared input, per-head scales without heads,
      an embedding rule that matches no declared embedding table, group sizes not dividing D,
      static activation scales without stats, linears of one input quantizing it differently,
      `rotate_residual` on a tree it cannot rotate (see `model_rotation.rotate_residual`).
  """
  # Readers of a rotated residual stream are not smoothed: the rotation has spread their outlier
  # channels already (smoothing on top measured worse on the demo, EVALUATION.md).
  unsmoothed = rotated_readers(params) if cfg.rotate_residual else set()
  params, stats = rotated_model(params, cfg, stats)
  layouts = _declare_shared_inputs(_measured_layouts(params, linear_layouts(params), stats), cfg)
  check_rules(cfg, layouts)
  out = _copy_dicts(params)
  _quantize_embeddings(params, out, cfg)
  groups: dict[str, list[LinearLayout]] = {}
  for path, lay in layouts.items():
    groups.setdefault(lay.group, []).append(lay)

  # pi0.5's adaptive norms are Dense layers (linears a rule may pack) that the smoothing of the
  # group they feed is folded into: pack them last, from the folded weights (`out`), or the fold
  # would be lost (or hit a packed kernel).
  # Likewise the producers that a down projection's smoothing folds into (`LinearLayout.producer`).
  receivers = {f"{lay.norm}/Dense_0/kernel" for lay in layouts.values() if lay.norm_kind == "adarms"}
  receivers |= {lay.producer for lay in layouts.values() if lay.producer is not None}
  items = sorted(groups.items(), key=lambda kv: (any(m.path in receivers for m in kv[1]), kv[0]))
  items = [(g, ms) for g, ms in items if any(cfg.rule_for(m.path) is not None for m in ms)]
  # Two stages: this thread reads a group's weights and builds its transform (folding smoothing
  # into norms and producers, in group order), then hands the per-layer packing to one
  # background thread and goes on to the next group, so reading a streamed checkpoint, building
  # transforms and compiling overlap the packing of the group before. At most one group packs
  # at a time; a group whose preparation touches a weight of the packing group waits for it.
  cancel = threading.Event()
  bar = tqdm(total=len(items), desc="pack", unit="group", disable=not progress)
  pending, pending_paths = None, set()

  def finish():
    for path, packed in pending.result():
      _set(out, path, packed)
    bar.update(1)

  with ThreadPoolExecutor(1, thread_name_prefix="duquant-pack") as pool:
    try:
      for group, members in items:
        if pending is not None and _touches(members) & pending_paths:
          finish()
          pending = None
        weights = {m.path: _weight_array(_get(out, m.path)) for m in members}  # folds so far
        pack = _quantize_group(out, cfg, stats, group, members, weights, unsmoothed=unsmoothed,
                               cancelled=cancel.is_set)
        if pending is not None:
          finish()
        if any(isinstance(w, jax.core.Tracer) for w in weights.values()):
          pending = Future()  # abstract evaluation (`jax.eval_shape`): tracers stay in this thread
          pending.set_result(pack())
        else:
          pending = pool.submit(lambda pack=pack: [(p, jax.block_until_ready(v))
                                                   for p, v in pack()])
        pending_paths = {m.path for m in members}
      if pending is not None:
        finish()
    except BaseException:
      cancel.set()  # the packing thread stops at its next layer
      raise
    finally:
      bar.close()
  return out


def _touches(members: list[LinearLayout]) -> set[str]:
  """Paths of linears that preparing this group reads or folds into: its members, their
  producers and their adaptive norms' Dense kernels."""
  paths = {m.path for m in members}
  paths |= {m.producer for m in members if m.producer is not None}
  paths |= {f"{m.norm}/Dense_0/kernel" for m in members if m.norm_kind == "adarms"}
  return paths


def _quantize_group(out: Params, cfg: QuantConfig, stats: Any, group: str,
                    members: list[LinearLayout], weights: dict[str, Any], *,
                    unsmoothed: set[str], cancelled: Callable[[], bool]
                    ) -> Callable[[], list[tuple[str, PackedLinear]]]:
  """One group of linears reading the same input (`quantize_params`): checks its rules and
  stats, builds its input transform and folds the smoothing into `out` (norms, producers, float
  members); returns the packing of its members as a function of no arguments giving
  [(path, PackedLinear)] (run in the packing thread, which stops early once `cancelled()`).

  `weights`: each member's weight as the group reads it (smoothing folds of earlier groups
  applied), jax or host arrays.
  """
  rules = {m.path: cfg.rule_for(m.path) for m in members}
  active = [m for m in members if rules[m.path] is not None]
  lead = rules[active[0].path]
  if group in unsmoothed and lead.smooth_alpha is not None:
    lead = dataclasses.replace(lead, smooth_alpha=None)
    rules = {p: None if r is None else dataclasses.replace(r, smooth_alpha=None)
             for p, r in rules.items()}
  for m in active[1:]:
    r = rules[m.path]
    if any(getattr(r, f) != getattr(lead, f) for f in _TRANSFORM_FIELDS):
      raise ValueError(f"{m.path} and {active[0].path} read the same input but their rules "
                       f"differ in the input transform ({', '.join(_TRANSFORM_FIELDS)})")
  quantizing = [rules[m.path] for m in active if rules[m.path].act_bits is not None]
  for r in quantizing[1:]:
    if any(getattr(r, f) != getattr(quantizing[0], f) for f in _QUANTIZER_FIELDS):
      raise ValueError(f"{group}: linears reading this input quantize it differently "
                       f"({', '.join(_QUANTIZER_FIELDS)} must agree)")
  for m in active:
    _check_finite(m.path, weights[m.path])
    if m.in_features % lead.block_size and lead.rotation != "none":
      raise ValueError(f"{m.path}: block size {lead.block_size} does not divide the input width "
                       f"K={m.in_features}")
  layout0 = active[0]
  key = _layer_key(cfg.seed, group)
  st = next((s for s in (_stats_for(stats, m.path) for m in members) if s is not None), None)
  needs_stats = lead.smooth_alpha is not None or lead.rotation == "greedy"
  if st is None and needs_stats:
    raise ValueError(f"{layout0.path}: no calibration stats for this layer, but its rule uses "
                     f"{'smoothing' if lead.smooth_alpha is not None else 'the greedy rotation'}; "
                     "pass stats from duquant_jax.calibrate (or use rotation='random'/'none' and "
                     "smooth_alpha=None)")
  absmax = samples = hessian = None
  if st is not None:
    absmax = jnp.asarray(st.absmax, jnp.float32)
    samples = jnp.asarray(st.samples, jnp.float32)
    _check_finite(f"stats[{layout0.path}].absmax", absmax)
    _check_finite(f"stats[{layout0.path}].samples", samples)
    expect = layout0.stack_shape + (layout0.in_features,)
    if absmax.shape != expect:
      raise ValueError(f"stats[{layout0.path}].absmax has shape {absmax.shape}, expected {expect}")
    hessian = getattr(st, "hessian", None)
  if any(rules[m.path].rounding == "gptq" for m in active):
    hessian = _checked_hessian(hessian, layout0)

  head_dim = layout0.head_dim if layout0.head_role == "in" else None
  if head_dim is not None and lead.rotation != "none":
    check_block_alignment(lead.block_size, head_dim, f"{layout0.path} (input of the attention "
                          "output projection: rotation blocks must stay inside a head)")
  transform, lam = None, None
  if lead.transforms_input:
    w_absmax = None
    if lead.smooth_alpha is not None:
      w_absmax = functools.reduce(jnp.maximum, [_w_absmax_in(weights[m.path], _shape_key(m)) for m in active])
    if absmax is None:  # activation-free transform: only rotation / permutation by weights
      absmax = jnp.ones(layout0.stack_shape + (layout0.in_features,), jnp.float32)
    w_cat = None
    if lead.rotation.startswith("weight_"):
      ns = layout0.num_stack
      w2s = [jax.vmap(lambda a, m=m: to_2d(a, m))(weights[m.path]) if ns else to_2d(
          weights[m.path], m) for m in active]
      w_cat = jnp.concatenate(w2s, axis=-1)
    transform = build_duquant_transform(
        samples, absmax, w_absmax, block_size=lead.block_size, key=key, alpha=lead.smooth_alpha,
        rotation=lead.rotation, permutation=lead.permutation,
        head_dim=head_dim, w=w_cat, max_steps=lead.rotation_steps)
    lam = transform.smooth
    # Rotations are stored rounded (float16, or int8 under `compact`); folding inverts the same
    # rounded values exactly (`InputTransform.fold`).
    transform = _store(transform, lead)

  # Smoothing: fold 1/lam into the norm where there is one, or into the producer's columns where
  # it would otherwise be the only online step; every member's weight gets diag(lam).
  online = fold = transform  # `fold`: the transform folded into W (online + what went offline)
  if transform is not None and lam is not None:
    if layout0.norm is None and layout0.producer is not None and transform.perm is None:
      # The smoothing leaves the online side; at most one block rotation stays there. (With a
      # permutation between two rotations, the smoothing merges into the first rotation at no
      # cost instead, as `recommended` packs it.)
      _fold_into_producer(out, layout0, lam)
      online = transform.replace(smooth=None)
    elif layout0.norm is not None:
      _fold_into_norm(out, layout0, lam)
      online = transform.replace(smooth=None)
      for m in members:
        if rules[m.path] is None:  # a float member of the group sees the smoothed input too
          w = weights[m.path]
          _set(out, m.path, _scale_input_rows(w, m, lam).astype(w.dtype))
    elif not (lead.compact and lead.rotation == "hadamard"):  # (generated blocks stay unmerged)
      # The online transform is the whole one: fold exactly what runs (its rotations rounded).
      online = fold = _store(transform.merged(), lead)
  if online is not None and not any(online.hadamard) and all(
      getattr(online, f) is None for f in ("smooth", "rot1", "perm", "rot2")):
    online = None

  # One static activation range per input group: its members quantize the same input.
  static = (None, None)
  if quantizing and quantizing[0].act_scale == "static":
    static = _static_range(samples, transform, quantizing[0], layout0.path)
  # Checked here, in group order, before the packing thread takes over.
  tiles = {m.path: _scale_tile(rules[m.path], m) for m in active}
  out_rots = {m.path: _output_rotation(rules[m.path], m, _layer_key(cfg.seed, m.path))
              for m in active}

  def pack() -> list[tuple[str, PackedLinear]]:
    done = []
    for m in active:
      rule = rules[m.path]
      rows, cols = tiles[m.path]
      out_rot = out_rots[m.path]
      # The packing folds the *full* transform (with smoothing) into W; the online part excludes
      # what went into the norm.
      x_clip = None
      if samples is not None and rule.clip_search:
        x_clip = samples[..., :rule.clip_rows, :]
      h = hessian if rule.rounding == "gptq" else None
      codes, scale, zero = _pack_layers(weights[m.path], fold, out_rot, x_clip, h,
                                        layout=_shape_key(m), rule=rule, rows=rows, cols=cols,
                                        cancelled=cancelled)
      if rule.compact and rule.weight_bits is not None:
        scale = scale.astype(jnp.float16)  # 2^-11 relative: far below a 4-bit step
        zero = None if zero is None else zero.astype(jnp.int8)  # integer-valued in the code range
      act_scale, act_zero = static if rule.act_bits is not None else (None, None)
      packed = PackedLinear(
          codes=codes, scale=scale, zero=zero,
          transform=online, out_rot=out_rot, w_shape=m.weight_shape, w_spec=m.w_spec,
          bits=rule.weight_bits, act_bits=rule.act_bits, act_symmetric=rule.act_symmetric,
          act_clip=rule.act_clip, act_min_tokens=rule.act_min_tokens, mode=cfg.mode,
          input_group=group if len(active) > 1 else None,  # same `online` for every member
          act_scale=act_scale, act_zero=act_zero)
      packed.validate()
      done.append((m.path, packed))
    return done

  return pack


def _measured_layouts(params: Params, layouts: dict[str, LinearLayout],
                      stats: Any) -> dict[str, LinearLayout]:
  """The layouts plus flax kernels of more than two axes (DenseGeneral, Einsum) that calibration
  saw: their contraction is not in the params, but their stats' width K is the contraction
  measured at the call (`calibrate_apply`), which the kernel's leading axes must make up.

  Raises:
    ValueError: no leading axes of the kernel multiply to the measured K.
  """
  from duquant_jax.models.layout_table import flat_items
  out = dict(layouts)
  for path, x in flat_items(params):
    shape = tuple(getattr(x, "shape", ()))
    st = _stats_for(stats, path)
    if (path in layouts or len(shape) < 3 or st is None
        or not (path == "kernel" or path.endswith("/kernel"))):
      continue
    k = np.shape(st.absmax)[-1]
    n = next((i for i in range(1, len(shape)) if math.prod(shape[:i]) == k), None)
    if n is None or np.ndim(st.absmax) != 1:
      raise ValueError(f"{path}: kernel of shape {shape} has no leading axes of size K={k}, the "
                       "width its calibration stats measured (stacked kernels are not supported)")
    c, o = "ACEGIJ"[:n], "NOPQRS"[:len(shape) - n]
    out[path] = LinearLayout(path=path, shape=shape, eqn=f"B{c},{c}{o}->B{o}", norm=None,
                             norm_kind=None, head_role=None, head_dim=None)
  return out


def _declare_shared_inputs(layouts: dict[str, LinearLayout],
                           cfg: QuantConfig) -> dict[str, LinearLayout]:
  """The layouts with `cfg.shared_inputs` groups set (`LinearLayout.shared`).

  Raises:
    ValueError: linears of one declared group that cannot share an input (input widths or stack
      shapes differ).
  """
  if not cfg.shared_inputs:
    return layouts
  out = dict(layouts)
  first: dict[str, LinearLayout] = {}
  for path, lay in layouts.items():
    group = cfg.input_group(path)
    if group is None:
      continue
    lead = first.setdefault(group, lay)
    if (lay.in_features, lay.stack_shape) != (lead.in_features, lead.stack_shape):
      raise ValueError(f"{path} and {lead.path} are declared to share an input ({group!r}) but "
                       f"read different widths: K={lay.in_features} {lay.stack_shape=} vs "
                       f"K={lead.in_features} {lead.stack_shape}")
    out[path] = dataclasses.replace(lay, shared=group)
  return out


def check_rules(cfg: QuantConfig, layouts: Mapping[str, LinearLayout]) -> None:
  """Warns once per rule that matches no linear layer, naming its pattern; raises where the config
  asks to quantize but no linear matches any of its (non-skip) rules.

  Presets name openpi's paths: on another model they match nothing, which would otherwise give a
  float model with no sign of it (`generic_config` matches any Dense / Einsum kernel).

  Raises:
    ValueError: the config has quantizing rules and none of them matches a linear of `layouts`.
  """
  report = match_rules(cfg, layouts)
  some = ", ".join(sorted(layouts)[:4]) + (", ..." if len(layouts) > 4 else "") or "none"
  for pattern in report.unused_rules:
    warnings.warn(f"rule {pattern!r} matches no linear layer of these params (linears: {some}); "
                  "patterns are matched with re.fullmatch on '/'-joined param paths",
                  UserWarning, stacklevel=3)
  if any(not r.skip for r in cfg.rules) and not any(cfg.rule_for(p) for p in layouts):
    patterns = [r.pattern for r in cfg.rules if not r.skip]
    raise ValueError(f"config {cfg.name!r} quantizes nothing: no linear layer matches its rules "
                     f"{patterns}; the linears of these params: {some}. Presets name openpi's "
                     "paths; for other models use duquant_jax.generic_config()")


def rotated_model(params: Params, cfg: QuantConfig, stats: Any = None) -> tuple[Params, Any]:
  """(params, stats) as `quantize_params` packs them: with `cfg.rotate_residual`, the float model
  with its residual streams and values rotated (`model_rotation.rotate_residual`, keyed by
  `cfg.seed`) and the statistics of its rotated inputs; otherwise both unchanged."""
  if not cfg.rotate_residual:
    return params, stats
  rotated, rotations = rotate_residual(params, key=_layer_key(cfg.seed, "rotate_residual"))
  return rotated, rotate_stats(stats, params, rotations)


def producer_smoothing(params: Params, packed: Params, layout: LinearLayout, rule: LayerRule,
                       stats: Any) -> Optional[jax.Array]:
  """The smoothing lam (stack..., F) that `quantize_params` folded into this linear's producer
  (`LinearLayout.producer`), or None if it folded none; from the float producer's up columns
  when it stayed float, else recomputed from the rule and stats as the packer did."""
  folds = rule is not None and rule.smooth_alpha is not None and rule.permutation == "none"
  if layout.producer is None or not folds:
    return None
  folded = _get(packed, layout.producer)
  if not isinstance(folded, PackedLinear):
    u0 = jnp.asarray(_get(params, layout.producer), jnp.float32)[..., 1, :, :]
    u1 = jnp.asarray(folded, jnp.float32)[..., 1, :, :]
    return jnp.sum(u0 * u0, axis=-2) / jnp.sum(u0 * u1, axis=-2)
  st = _stats_for(stats, layout.path)
  w_absmax = _w_absmax_in(_weight_array(_get(params, layout.path)), _shape_key(layout))
  return smoothing_factors(jnp.asarray(st.absmax, jnp.float32), w_absmax, rule.smooth_alpha)


def _quantize_embeddings(params: Params, out: Params, cfg: QuantConfig) -> None:
  """Replaces every declared embedding table that an embedding rule matches by a PackedEmbedding."""
  if not cfg.embeddings:
    return
  tables = embedding_paths(params)
  for r in cfg.embeddings:
    if not any(r.matches(p) for p in tables):
      raise ValueError(f"embedding rule {r.pattern!r} matches no embedding table; the declared "
                       f"tables in these params: {sorted(tables) or 'none'}")
  for path in sorted(tables):
    r = cfg.embedding_rule_for(path)
    if r is None:
      continue
    _set(out, path, quantize_embedding(
        jnp.asarray(_get(params, path)), bits=r.bits, group_size=r.group_size,
        symmetric=r.symmetric, scale_dtype=r.scale_dtype, clip_grid=r.clip_grid, name=path))


def _store(t: InputTransform, rule: LayerRule) -> InputTransform:
  """The transform as stored: generated Hadamard blocks or int8 rotations under `rule.compact`,
  float16 rotations otherwise (entries in [-1, 1])."""
  if not rule.compact:
    return _half_rotations(t)
  if rule.rotation == "hadamard" and not t.merged_smooth:
    t = t.generate_hadamard(rule.block_size)
  return t.compact()


def _half_rotations(t: InputTransform) -> InputTransform:
  half = lambda r: None if r is None else r.astype(jnp.float16)
  return t.replace(rot1=half(t.rot1), rot2=half(t.rot2))


def _scale_input_rows(w: jax.Array, layout: LinearLayout, lam: jax.Array) -> jax.Array:
  """Multiplies the input channels of a float weight by lam (stack..., K), in its own layout."""
  spec = layout.w_spec
  (c,) = layout.contract_letters  # shared-input groups contract one axis (D)
  axis = layout.num_stack + spec.index(c)
  shape = [1] * w.ndim
  shape[axis] = w.shape[axis]
  lead = list(lam.shape[:-1]) + [1] * (w.ndim - layout.num_stack)
  lead[axis] = lam.shape[-1]
  return w.astype(jnp.float32) * lam.reshape(lead)


# ----------------------------------------------------------------------------------------------
# Inspection.


@dataclasses.dataclass(frozen=True)
class PackSummary:
  layers_quantized: int  # logical linears (q, k, v, o, gate, up, down count one each per layer)
  weight_bytes_fp: int  # bf16 bytes of the quantized tensors (linears and embedding tables)
  weight_bytes_packed: int  # their packed bytes, scales and transforms included
  bits: dict[str, int]  # weight / table path -> bits
  # The whole param tree: every float leaf counted as bf16 (as openpi deploys it; a packed tensor at
  # its float shape) vs the packed tree (packed tensors as stored, other float leaves as bf16).
  tree_bytes_bf16: int = 0
  tree_bytes_packed: int = 0

  @property
  def bits_per_weight(self) -> float:
    """Stored bits per quantized weight: codes, scales, zero points and transforms (int4 codes
    alone are 4.0)."""
    return 16.0 * self.weight_bytes_packed / self.weight_bytes_fp if self.weight_bytes_fp else 0.0

  @property
  def tree_ratio(self) -> float:
    """Whole-tree packed / bf16 bytes (the device-memory ratio of all weights)."""
    return self.tree_bytes_packed / self.tree_bytes_bf16 if self.tree_bytes_bf16 else float("nan")


def _logical_linears(path: str, shape: tuple[int, ...], num_stack: int) -> int:
  per_layer = 2 if path.endswith(("kv_einsum/w", "gating_einsum")) or "kv_einsum_" in path else 1
  return per_layer * int(np.prod(shape[:num_stack], dtype=np.int64))


def summarize(packed: Params) -> PackSummary:
  """Counts quantized layers and their bytes (bf16 vs packed) in a packed tree.

  Works on concrete arrays and on `jax.eval_shape` outputs (ShapeDtypeStructs) alike.
  """
  layers = fp = pk = 0
  bits = {}
  for path, leaf in _packed_items(packed):
    if isinstance(leaf, PackedLinear):
      layers += _logical_linears(path, leaf.shape, leaf.codes.ndim - 2)
    fp += 2 * math.prod(leaf.shape)
    pk += leaf.nbytes()
    bits[path] = 32 if leaf.bits is None else leaf.bits  # None: a transforms-only float32 weight
  # Everything else: float leaves at bf16 (2 bytes), integer / bool leaves as they are.
  packed_ids = {id(leaf) for _, leaf in _packed_items(packed)}
  rest = [x for x in jax.tree.leaves(packed, is_leaf=lambda n: id(n) in packed_ids)
          if id(x) not in packed_ids]
  rest_bytes = sum(2 * math.prod(x.shape) if jnp.issubdtype(x.dtype, jnp.floating)
                   else tree_nbytes(x) for x in rest)
  return PackSummary(layers_quantized=layers, weight_bytes_fp=fp, weight_bytes_packed=pk, bits=bits,
                     tree_bytes_bf16=fp + rest_bytes, tree_bytes_packed=pk + rest_bytes)


def _packed_items(tree: Params):
  """(path, PackedLinear | PackedEmbedding) for every packed tensor of a tree, in path order."""
  def walk(prefix, node):
    if isinstance(node, (PackedLinear, PackedEmbedding)):
      yield prefix, node
    elif isinstance(node, Mapping):
      for k in sorted(node):
        yield from walk(f"{prefix}/{k}" if prefix else k, node[k])
  return list(walk("", tree))
