"""Step 4 of `quantize_params`: each member's weight with the transform folded in, as int codes.

For every packed member of a group: W' = T^T diag(lam) W (the folded transform, `Folded.fold`), an
optional output rotation restored after the matmul (its exact inverse folded into W'), then int4 /
int8 codes per output channel / head / input group with the clip ratio searched on the
transformed calibration rows (`numerics.quantize_weight`), rounded to nearest or by GPTQ against
the transformed input's Hessian (`duquant_jax.gptq`); static activation scales where the rule
asks for them. The result is a `PackedLinear` per member.

`prepare_pack` runs the checks and draws the per-member constants in group order, on the thread
that plans; `pack_group` then does the per-layer work, which `quantize_params` runs on a
background thread. Token embedding tables become `PackedEmbedding`s (`pack_embeddings`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from duquant_jax.config import LayerRule, QuantConfig
from duquant_jax.embedding import PackedEmbedding, quantize_embedding
from duquant_jax.gptq import gptq_codes, transform_hessian
from duquant_jax import numerics
from duquant_jax.layouts import LinearLayout, embedding_paths, to_2d
from duquant_jax.numerics import codes_dtype, qrange, quantize_weight
from duquant_jax.packed import PackedLinear
from duquant_jax.quantize.fold import Folded
from duquant_jax.quantize.plan import GroupPlan, check_finite, layer_key
from duquant_jax.quantize.transform import on_device, shape_key
from duquant_jax.transforms import (InputTransform, block_inverse, check_block_alignment,
                                    random_block_rotation, rotate_output)
from duquant_jax.treepath import get_path

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class PackJob:
  """One group's packing, checked: everything `pack_group` needs besides the weights.

  `tiles`: each member's scale tile (rows, cols); `out_rots`: its output rotation (stack..., N/b,
  b, b) float16 or None; `static`: the group's (act_scale, act_zero) (stack..., 1) of a static
  activation quantizer, or (None, None).
  """

  plan: GroupPlan
  folded: Folded
  tiles: Mapping[str, tuple[int, int]]
  out_rots: Mapping[str, Optional[jax.Array]]
  static: tuple[Optional[jax.Array], Optional[jax.Array]]
  mode: str


def prepare_pack(plan: GroupPlan, transform: Optional[InputTransform], folded: Folded,
                 cfg: QuantConfig) -> PackJob:
  """Checks one group's packing and draws its per-member constants (in group order).

  Args:
    plan: the group; transform: the whole stored transform (`build_transform`), which the static
      activation range is measured after; folded: where the smoothing went (`fold_smoothing`).
    cfg: the config (its seed keys the output rotations, its mode is stored).

  Returns:
    The PackJob.

  Raises:
    ValueError: static activation scales without stats, per-head scales without heads, group or
      block sizes not dividing the width or head_dim, NaN / Inf static scales.
  """
  static = (None, None)
  quantizing = plan.quantizing
  if quantizing and quantizing[0].act_scale == "static":
    static = static_range(plan.samples, transform, quantizing[0], plan.layout0.path)
  tiles = {m.path: scale_tile(plan.rules[m.path], m) for m in plan.active}
  out_rots = {m.path: output_rotation(plan.rules[m.path], m, layer_key(cfg.seed, m.path))
              for m in plan.active}
  return PackJob(plan=plan, folded=folded, tiles=tiles, out_rots=out_rots, static=static,
                 mode=cfg.mode)


def pack_group(job: PackJob, weights: Mapping[str, Any], *,
               cancelled: Callable[[], bool] = lambda: False) -> list[tuple[str, PackedLinear]]:
  """[(path, PackedLinear)] of every packed member of the group, validated.

  Args:
    job: from `prepare_pack`.
    weights: each member's weight as the group read it (jax or host arrays).
    cancelled: asked before each stacked layer; the packing stops with `Cancelled` once true.
  """
  plan, samples = job.plan, job.plan.samples
  done = []
  for m in plan.active:
    rule = plan.rules[m.path]
    rows, cols = job.tiles[m.path]
    out_rot = job.out_rots[m.path]
    # The packing folds the *full* transform (with smoothing) into W; the online part excludes
    # what went into the norm.
    x_clip = None
    if samples is not None and rule.clip_search:
      x_clip = samples[..., :rule.clip_rows, :]
    h = plan.hessian if rule.rounding == "gptq" else None
    codes, scale, zero = pack_layers(weights[m.path], job.folded.fold, out_rot, x_clip, h,
                                     layout=shape_key(m), rule=rule, rows=rows, cols=cols,
                                     cancelled=cancelled)
    if rule.compact and rule.weight_bits is not None:
      scale = scale.astype(jnp.float16)  # 2^-11 relative: far below a 4-bit step
      zero = None if zero is None else zero.astype(jnp.int8)  # integer-valued in the code range
    act_scale, act_zero = job.static if rule.act_bits is not None else (None, None)
    packed = PackedLinear(
        codes=codes, scale=scale, zero=zero,
        transform=job.folded.online, out_rot=out_rot, w_shape=m.weight_shape, w_spec=m.w_spec,
        bits=rule.weight_bits, act_bits=rule.act_bits, act_symmetric=rule.act_symmetric,
        act_clip=rule.act_clip, act_min_tokens=rule.act_min_tokens, mode=job.mode,
        input_group=plan.group if len(plan.active) > 1 else None,  # one `online` for every member
        act_scale=act_scale, act_zero=act_zero)
    packed.validate()
    done.append((m.path, packed))
  return done


# ----------------------------------------------------------------------------------------------
# Per-member constants.


def scale_tile(rule: LayerRule, layout: LinearLayout) -> tuple[int, int]:
  """(rows, cols) of one weight scale: per output channel (1, K), per head (H, K) or per input
  group (1, group_size).

  Raises:
    ValueError: per-head scales on a weight without head-structured outputs, or a group size not
      dividing K.
  """
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


def output_rotation(rule: LayerRule, layout: LinearLayout, key) -> Optional[jax.Array]:
  """The random block rotation of the weight's outputs (stack..., N / b, b, b) float16, restored
  after the matmul, or None where the rule has none.

  Raises:
    ValueError: the block size does not divide N (or, for head-structured outputs, head_dim).
  """
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


def static_range(samples, transform, rule: LayerRule, path: str):
  """(act_scale, act_zero) (stack..., 1) of a static activation quantizer, from the calibration
  rows as the quantizer will see them (after the whole input transform).

  Raises:
    ValueError: no sample rows, or a NaN / Inf scale.
  """
  if samples is None:
    raise ValueError(f"{path}: act_scale='static' needs calibration stats (sample rows) for this "
                     "layer; pass stats from duquant_jax.calibrate")
  x = samples if transform is None else transform.apply(samples, precision=jax.lax.Precision.HIGHEST)
  scale, zero = numerics.static_range(x, rule.act_bits, symmetric=rule.act_symmetric,
                                 percentile=rule.act_percentile)
  check_finite(f"{path}: static activation scale", scale)
  return scale, zero


# ----------------------------------------------------------------------------------------------
# Per-layer packing.


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
    qmin, qmax = qrange(rule.weight_bits, rule.weight_symmetric)
    codes = gptq_codes(w2.T, h_l, scale, zero, qmin=qmin, qmax=qmax, damp=rule.gptq_damp,
                       block=rule.gptq_block, ordered=rule.gptq_act_order)
  return codes.astype(codes_dtype(rule.weight_bits)), scale, zero


class Cancelled(Exception):
  """The packing thread stopped because `quantize_params` failed or was interrupted."""


def pack_layers(w, transform, out_rot, samples, hessian, *, layout, rule, rows, cols,
                cancelled: Callable[[], bool] = lambda: False):
  """`_pack_one` on every stacked layer of w: (codes (stack..., N, K), scale, zero).

  A Python loop over the stack, one jitted call per layer: the float32 working set is one layer's
  (a whole-stack program let XLA keep float32 copies of the stack: gigabytes at full size), and
  `w` may be a host array, read a layer at a time. `hessian` (stack..., NB, HB, HB) of the
  untransformed input, for `rule.rounding == "gptq"`, else None. `cancelled()` is asked before
  each layer (`Cancelled` is raised once it is true).

  Raises:
    NotImplementedError: weights with more than one stack axis.
  """
  ns = layout.num_stack
  pack = functools.partial(_pack_one, layout=layout, rule=rule, rows=rows, cols=cols)
  if ns == 0:
    return pack(on_device(w), transform, out_rot, samples, hessian)
  if ns != 1:
    raise NotImplementedError(f"weights with {ns} stack axes ({layout.shape}) are not supported")
  take = lambda t, i: None if t is None else jax.tree.map(lambda a: a[i], t)

  def layer(i):
    if cancelled():
      raise Cancelled
    return pack(on_device(w[i]), take(transform, i), take(out_rot, i), take(samples, i),
                take(hessian, i))

  outs = [layer(i) for i in range(layout.shape[0])]
  return tuple(None if parts[0] is None else jnp.stack(parts) for parts in zip(*outs))


# ----------------------------------------------------------------------------------------------
# Embedding tables.


def pack_embeddings(params: Params, cfg: QuantConfig) -> dict[str, PackedEmbedding]:
  """{path: PackedEmbedding} of every declared embedding table that an embedding rule matches.

  Raises:
    ValueError: an embedding rule matching no declared table (naming the tables), or a table the
      rule cannot quantize (`embedding.quantize_embedding`).
  """
  if not cfg.embeddings:
    return {}
  tables = embedding_paths(params)
  for r in cfg.embeddings:
    if not any(r.matches(p) for p in tables):
      raise ValueError(f"embedding rule {r.pattern!r} matches no embedding table; the declared "
                       f"tables in these params: {sorted(tables) or 'none'}")
  out = {}
  for path in sorted(tables):
    r = cfg.embedding_rule_for(path)
    if r is None:
      continue
    out[path] = quantize_embedding(
        jnp.asarray(get_path(params, path)), bits=r.bits, group_size=r.group_size,
        symmetric=r.symmetric, scale_dtype=r.scale_dtype, clip_grid=r.clip_grid, name=path)
  return out
