"""Step 1 of `quantize_params`: which linears are packed together, in what order, and the checks.

The packer works on groups of linears that read one input (q / kv after one RMSNorm; SigLIP's
q / k / v; a generic model's declared `QuantConfig.shared_inputs`; else one linear alone): one
input transform serves a group, and its smoothing folds into the norm in front of it. Planning
declares every linear's layout (`duquant_jax.layouts`, plus flax kernels of more than two axes
measured by calibration), groups them, orders the groups so that weights receiving another
group's smoothing fold are packed after it, and checks each group's rules, weights and stats
(`plan_group`) before anything is computed.

With `QuantConfig.rotate_residual` the model is first rotated (`rotated_model`); linears reading a
rotated stream are then not smoothed.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.config import LayerRule, QuantConfig, match_rules
from duquant_jax.layouts import LinearLayout, linear_layouts
from duquant_jax.model_rotation import rotate_residual, rotate_stats
from duquant_jax.transforms import check_block_alignment
from duquant_jax.treepath import flat_items

Params = dict[str, Any]
# Fields of a rule that define the input transform; linears sharing an input must agree on them.
TRANSFORM_FIELDS = ("block_size", "rotation", "permutation", "rotation_steps", "smooth_alpha")
# Members of one input group that quantize activations must agree on these too (one quantized
# input serves them all).
QUANTIZER_FIELDS = ("act_scale", "act_percentile")


@dataclasses.dataclass(frozen=True, eq=False)
class GroupPlan:
  """One group of linears reading the same input, checked and ready for its transform.

  `rules` maps every member's path to its rule (None: the member stays float, yet sees the
  smoothed input); `active` are the members a rule packs, `lead` the rule of the first of them
  (its transform fields hold for all). Stats are those of the group's input: `absmax`
  (stack..., K) and `samples` (stack..., R, K) float32, `hessian` (stack..., NB, HB, HB) where a
  member rounds with GPTQ; all None without stats.
  """

  group: str
  members: tuple[LinearLayout, ...]
  rules: Mapping[str, Optional[LayerRule]]
  active: tuple[LinearLayout, ...]
  lead: LayerRule
  key: jax.Array  # the group's rotation key (`layer_key(cfg.seed, group)`)
  absmax: Optional[jax.Array]
  samples: Optional[jax.Array]
  hessian: Optional[jax.Array]
  # H of the attention output projection's input (rotation blocks stay inside a head), else None.
  head_dim: Optional[int]

  @property
  def layout0(self) -> LinearLayout:
    """The first packed member: its layout stands for the group's input."""
    return self.active[0]

  @property
  def quantizing(self) -> list[LayerRule]:
    """The rules of the members that quantize their activations."""
    return [self.rules[m.path] for m in self.active if self.rules[m.path].act_bits is not None]


def layer_key(seed: int, path: str) -> jax.Array:
  """The PRNG key of a layer's (or group's) random choices: `seed` folded with a hash of `path`."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def stats_for(stats: Any, path: str) -> Any:
  """The stats of one linear's input from `CalibStats` or a mapping, or None."""
  if stats is None:
    return None
  layers = getattr(stats, "layers", stats)
  return layers.get(path) if isinstance(layers, Mapping) else None


def check_finite(name: str, x) -> None:
  """Raises ValueError naming `name` if x has a NaN or Inf (tracers pass unchecked).

  Raises:
    ValueError: `{name}: contains NaN or Inf`.
  """
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


def rotated_model(params: Params, cfg: QuantConfig, stats: Any = None) -> tuple[Params, Any]:
  """(params, stats) as `quantize_params` packs them: with `cfg.rotate_residual`, the float model
  with its residual streams and values rotated (`model_rotation.rotate_residual`, keyed by
  `cfg.seed`) and the statistics of its rotated inputs; otherwise both unchanged."""
  if not cfg.rotate_residual:
    return params, stats
  rotated, rotations = rotate_residual(params, key=layer_key(cfg.seed, "rotate_residual"))
  return rotated, rotate_stats(stats, params, rotations)


# ----------------------------------------------------------------------------------------------
# Layouts and groups.


def measured_layouts(params: Params, layouts: dict[str, LinearLayout],
                     stats: Any) -> dict[str, LinearLayout]:
  """The layouts plus flax kernels of more than two axes (DenseGeneral, Einsum) that calibration
  saw: their contraction is not in the params, but their stats' width K is the contraction
  measured at the call (`calibrate_apply`), which the kernel's leading axes must make up.

  Raises:
    ValueError: no leading axes of the kernel multiply to the measured K.
  """
  out = dict(layouts)
  for path, x in flat_items(params):
    shape = tuple(getattr(x, "shape", ()))
    st = stats_for(stats, path)
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


def declare_shared_inputs(layouts: dict[str, LinearLayout],
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


def plan_layouts(params: Params, cfg: QuantConfig, stats: Any) -> dict[str, LinearLayout]:
  """Every linear of `params` that the packer sees, by path: the declared layouts, kernels measured
  by calibration (`measured_layouts`) and the config's shared-input groups."""
  return declare_shared_inputs(measured_layouts(params, linear_layouts(params), stats), cfg)


def check_rules(cfg: QuantConfig, layouts: Mapping[str, LinearLayout]) -> None:
  """Warns once per rule that matches no linear layer (unless `LayerRule.optional`), naming its
  pattern, or whose layers all match earlier rules; raises where the config
  asks to quantize but no linear matches any of its (non-skip) rules.

  Presets name openpi's paths: on another model they match nothing, which would otherwise give a
  float model with no sign of it (`generic_config` matches any Dense / Einsum kernel).

  Raises:
    ValueError: the config has quantizing rules and none of them matches a linear of `layouts`.
  """
  report = match_rules(cfg, layouts)
  some = ", ".join(sorted(layouts)[:4]) + (", ..." if len(layouts) > 4 else "") or "none"
  for pattern in report.unused_rules:
    taken = report.shadowed_rules.get(pattern)
    if taken:
      warnings.warn(f"rule {pattern!r} takes no layer: the {len(taken)} linear(s) it matches "
                    f"(e.g. {taken[0]}) all match an earlier rule, and the first match wins",
                    UserWarning, stacklevel=3)
      continue
    if pattern in report.optional_rules:
      continue
    warnings.warn(f"rule {pattern!r} matches no linear layer of these params (linears: {some}); "
                  "patterns are matched with re.fullmatch on '/'-joined param paths",
                  UserWarning, stacklevel=3)
  if any(not r.skip for r in cfg.rules) and not any(cfg.rule_for(p) for p in layouts):
    patterns = [r.pattern for r in cfg.rules if not r.skip]
    raise ValueError(f"config {cfg.name!r} quantizes nothing: no linear layer matches its rules "
                     f"{patterns}; the linears of these params: {some}. Presets name openpi's "
                     "paths; for other models use duquant_jax.generic_config()")


def receivers(layouts: Mapping[str, LinearLayout]) -> set[str]:
  """Linears that another group's smoothing folds into: pi0.5's adaptive norms (Dense layers a
  rule may pack) and the producers of down projections (`LinearLayout.producer`)."""
  out = {lay.adarms_dense for lay in layouts.values() if lay.adarms_dense}
  return out | {lay.producer for lay in layouts.values() if lay.producer is not None}


def group_order(layouts: Mapping[str, LinearLayout],
                cfg: QuantConfig) -> list[tuple[str, list[LinearLayout]]]:
  """[(group, members)] of the groups with at least one packed member, in packing order: groups
  holding a receiver of another group's fold last (packed from the folded weights, or the fold
  would be lost or hit a packed kernel), then by group name."""
  groups: dict[str, list[LinearLayout]] = {}
  for lay in layouts.values():
    groups.setdefault(lay.group, []).append(lay)
  late = receivers(layouts)
  items = sorted(groups.items(), key=lambda kv: (any(m.path in late for m in kv[1]), kv[0]))
  return [(g, ms) for g, ms in items if any(cfg.rule_for(m.path) is not None for m in ms)]


def touches(members: list[LinearLayout]) -> set[str]:
  """Paths of linears that preparing this group reads or folds into: its members, their
  producers and their adaptive norms' Dense kernels."""
  paths = {m.path for m in members}
  paths |= {m.producer for m in members if m.producer is not None}
  paths |= {m.adarms_dense for m in members if m.adarms_dense}
  return paths


# ----------------------------------------------------------------------------------------------
# One group.


def plan_group(cfg: QuantConfig, stats: Any, group: str, members: list[LinearLayout],
               weights: Mapping[str, Any], *, unsmoothed: set[str] = frozenset()) -> GroupPlan:
  """Checks one group's rules, weights and stats, and gathers what its transform needs.

  Args:
    cfg: the config; stats: as `quantize_params` takes them.
    group: the group's name (`LinearLayout.group`); members: its linears, at least one packed.
    weights: each member's weight as the group reads it (folds of earlier groups applied).
    unsmoothed: groups reading a rotated residual stream (their rules lose the smoothing).

  Returns:
    The GroupPlan.

  Raises:
    ValueError: members whose rules differ in the input transform or the activation quantizer,
      NaN / Inf weights or stats, block sizes not dividing the width or head_dim, missing stats
      where the rule needs them, stats of the wrong shape, a missing or mis-shaped GPTQ Hessian.
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
    if any(getattr(r, f) != getattr(lead, f) for f in TRANSFORM_FIELDS):
      raise ValueError(f"{m.path} and {active[0].path} read the same input but their rules "
                       f"differ in the input transform ({', '.join(TRANSFORM_FIELDS)})")
  quantizing = [rules[m.path] for m in active if rules[m.path].act_bits is not None]
  for r in quantizing[1:]:
    if any(getattr(r, f) != getattr(quantizing[0], f) for f in QUANTIZER_FIELDS):
      raise ValueError(f"{group}: linears reading this input quantize it differently "
                       f"({', '.join(QUANTIZER_FIELDS)} must agree)")
  for m in active:
    check_finite(m.path, weights[m.path])
    if m.in_features % lead.block_size and lead.rotation != "none":
      raise ValueError(f"{m.path}: block size {lead.block_size} does not divide the input width "
                       f"K={m.in_features}")
  layout0 = active[0]
  key = layer_key(cfg.seed, group)
  st = next((s for s in (stats_for(stats, m.path) for m in members) if s is not None), None)
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
    check_finite(f"stats[{layout0.path}].absmax", absmax)
    check_finite(f"stats[{layout0.path}].samples", samples)
    expect = layout0.stack_shape + (layout0.in_features,)
    if absmax.shape != expect:
      raise ValueError(f"stats[{layout0.path}].absmax has shape {absmax.shape}, expected {expect}")
    hessian = getattr(st, "hessian", None)
  if any(rules[m.path].rounding == "gptq" for m in active):
    hessian = checked_hessian(hessian, layout0)

  head_dim = layout0.head_dim if layout0.head_role == "in" else None
  if head_dim is not None and lead.rotation != "none":
    check_block_alignment(lead.block_size, head_dim, f"{layout0.path} (input of the attention "
                          "output projection: rotation blocks must stay inside a head)")
  return GroupPlan(group=group, members=tuple(members), rules=rules, active=tuple(active),
                   lead=lead, key=key, absmax=absmax, samples=samples, hessian=hessian,
                   head_dim=head_dim)


def checked_hessian(hessian, layout: LinearLayout) -> jax.Array:
  """The stats' Hessian (stack..., NB, HB, HB) as float32, checked against the layout.

  Raises:
    ValueError: no Hessian, a shape that does not match the layout, NaN / Inf.
  """
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
  check_finite(f"{layout.path}: Hessian", hessian)
  return hessian
