"""Attention temperature matching and output balancing, calibrated against the FP policy and folded
into the weights.

QuantVLA (CVPR 2026) found that W4A8 breaks a VLA's action expert through its attention, and fixes
it with two calibrated scalars that cost nothing at inference. This module follows that idea:

- temperature: quantization noise in q and k changes the spread of the attention logits, i.e. the
  softmax temperature. Softmax ignores a shift of a row, so the spread is measured around each
  row's mean over the valid keys: per layer and query head, rms_c = RMS of the row-centred logits
  q.k / sqrt(H). The head's q output channels are multiplied by tau = rms_c(FP) / rms_c(packed),
  which multiplies its logits by tau exactly (RoPE acts on each head linearly). Multi-query
  attention shares one k across the heads, so a per-head scalar can only go into q.
- output: per layer, the attention output projection's output (before pi0.5's gate) is
  multiplied by beta = rms(FP) / rms(packed), restoring the energy the attention adds to the
  residual stream; measured after the temperature fold.

Both policies see the same inputs: each calibration batch's observations and the FP policy's own
flow trajectory x_t (the packed policy evaluated on it, with its own KV cache), so the statistics
differ by quantization only. The LLM's attention (expert 0) is measured in the prefix pass, the
action expert's (expert 1) over all flow steps.

The fold (`scale_outputs`) multiplies output channels in place: a float weight in its own layout;
a `PackedLinear`'s per-output-channel scales (codes and zero points unchanged, since
scale * (codes - zero) scales exactly), whose `compact` float16 scales are rounded back to float16.

Axes: B batch, T query tokens, S key tokens, K kv heads, G query heads per kv head, N = K G query
heads, H head dim, D width, L layers, A action horizon, P scale groups of a linear's outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.calib_data import validate_batches
from duquant_jax.config import QuantConfig
from duquant_jax.layouts import GEMMA_LAYERS, linear_layouts
from duquant_jax.models.pi0 import Pi0, Policy, flow_times
from duquant_jax.packed import PackedLinear
from duquant_jax.quantize import rotated_model
from duquant_jax.runtime import PackedRuntime
from duquant_jax.treepath import copy_dicts, get_path, has_path, set_path

Params = dict[str, Any]


def _suffix(expert: int) -> str:
  """The param-name suffix of Gemma expert `expert` (openpi's: none for the LLM, `_1`, ...)."""
  return "" if expert == 0 else f"_{expert}"


def attention_paths(expert: int) -> tuple[str, str]:
  """(q weight path, attention output weight path) of Gemma expert `expert` (0: the LLM)."""
  sfx = _suffix(expert)
  return (f"{GEMMA_LAYERS}/attn/q_einsum{sfx}/w", f"{GEMMA_LAYERS}/attn/attn_vec_einsum{sfx}/w")


def _check_experts(params: Params, experts) -> None:
  for e in experts:
    for path in attention_paths(e):
      if not isinstance(params, Mapping) or not has_path(params, path):
        raise ValueError(f"expert {e} has no attention weight {path!r} in this tree (pi0 / pi0.5: "
                         "expert 0 is the LLM, 1 the action expert)")


# ------------------------------------------------------------------------------------------------
# Statistics.


@flax.struct.dataclass
class AttentionMoments:
  """Second moments of one linear's attention statistic, summed over calibration values, for the
  tree measured (x) and the reference tree (r) on the same inputs: row-centred logits per query
  head for a q weight (P = N), the output per layer for an attention output weight (P = 1)."""

  xx: jax.Array  # (L, P) sum of x^2
  rr: jax.Array  # (L, P) sum of r^2
  xr: jax.Array  # (L, P) sum of x r
  count: jax.Array  # (L, 1) values per group

  def __add__(self, other: "AttentionMoments") -> "AttentionMoments":
    return jax.tree.map(jnp.add, self, other)

  @property
  def rms(self) -> jax.Array:
    """(L, P) RMS of x."""
    return jnp.sqrt(self.xx / jnp.maximum(self.count, 1.0))

  @property
  def reference_rms(self) -> jax.Array:
    """(L, P) RMS of r."""
    return jnp.sqrt(self.rr / jnp.maximum(self.count, 1.0))

  def scale(self, fit: str) -> jax.Array:
    """(L, P) the scalar s for x: "energy" matches the RMS (sqrt(rr / xx)), "least_squares"
    minimises sum (s x - r)^2 (xr / xx)."""
    if fit == "energy":
      return jnp.sqrt(self.rr / self.xx)
    if fit == "least_squares":
      return self.xr / self.xx
    raise ValueError(f"unknown fit {fit!r}; one of {FITS}")


FITS = ("energy", "least_squares")


def _moments(inter: Mapping, inter_ref: Mapping, experts: tuple[int, ...]) -> dict:
  """{path: AttentionMoments} of one call's sown attention values (`models.gemma.Attention`) and
  the reference's; experts with no tokens in the call are absent."""
  def attn_of(tree):
    return tree.get("PaliGemma", {}).get("llm", {}).get("layers", {}).get("attn", {})

  attn, attn_ref = attn_of(inter), attn_of(inter_ref)
  out = {}
  for e in experts:
    sfx = _suffix(e)
    if f"logits{sfx}" not in attn:
      continue
    q_path, o_path = attention_paths(e)
    (mask,) = attn[f"logits_mask{sfx}"]  # (L, B, T, S): the same for both (inputs only)
    m = mask[:, :, None, None]  # (L, B, 1, 1, T, S)
    n_row = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1)

    def centred(a, m=m, n_row=n_row):  # logits (L, B, K, G, T, S) around each row's mean
      (l,) = a[f"logits{sfx}"]
      l = l.astype(jnp.float32)
      mean = jnp.sum(jnp.where(m, l, 0.0), axis=-1, keepdims=True) / n_row
      return jnp.where(m, l - mean, 0.0)

    x, r = centred(attn), centred(attn_ref)
    heads = lambda v: v.reshape(v.shape[0], -1)  # (L, K, G) -> (L, N)
    per_head = lambda v: heads(jnp.sum(v, axis=(1, 4, 5)))
    count = jnp.sum(mask, axis=(1, 2, 3)).astype(jnp.float32)[:, None]
    out[q_path] = AttentionMoments(xx=per_head(x * x), rr=per_head(r * r), xr=per_head(x * r),
                                   count=count)
    valid = jnp.any(mask, axis=-1)[..., None]  # (L, B, T, 1): tokens that attend to anything
    (y,), (y_ref,) = attn[f"output{sfx}"], attn_ref[f"output{sfx}"]
    y = jnp.where(valid, y.astype(jnp.float32), 0.0)
    y_ref = jnp.where(valid, y_ref.astype(jnp.float32), 0.0)
    per_layer = lambda v: jnp.sum(v, axis=(1, 2, 3))[:, None]
    out[o_path] = AttentionMoments(
        xx=per_layer(y * y), rr=per_layer(y_ref * y_ref), xr=per_layer(y * y_ref),
        count=per_layer(jnp.broadcast_to(valid, y.shape).astype(jnp.float32)))
  return out


def _packed_runtime(policy: Policy) -> Policy:
  """The policy with a runtime that runs packed trees: its own if it has one (its execution
  choices), else `PackedRuntime()`."""
  if isinstance(policy.runtime, PackedRuntime):
    return policy
  return dataclasses.replace(policy, runtime=PackedRuntime())


def _apply(policy: Policy, params, *args, method):
  """module.apply on a float or packed tree, its variables laid out as `Policy.sample_actions`
  lays them out, with "intermediates" mutable -> (output, intermediates)."""
  variables = policy.runtime.variables(params)
  out, state = policy.module.apply(variables, *args, method=method, mutable=["intermediates"])
  return out, state.get("intermediates", {})


def _add(a: dict, b: dict) -> dict:
  out = dict(a)
  for p, v in b.items():
    out[p] = out[p] + v if p in out else v
  return out


@functools.partial(jax.jit, static_argnames=("policy", "experts", "num_steps"))
def _batch_moments(policy: Policy, params, reference, obs, noise, *, experts: tuple[int, ...],
                   num_steps: int) -> dict:
  """{path: AttentionMoments} of one batch: the prefix pass, then `num_steps` flow steps along
  the reference's flow trajectory, both trees on the same x_t."""
  b = noise.shape[0]
  dt = -1.0 / num_steps
  # Entered once per trace, as in `Policy.sample_actions` (one shared-input memo).
  with policy.runtime.context():
    (kv, prefix_mask), inter = _apply(policy, params, obs, method=Pi0.fill_cache)
    (kv_ref, mask_ref), inter_ref = _apply(policy, reference, obs, method=Pi0.fill_cache)
    prefix = _moments(inter, inter_ref, experts)

    def step(x_t, t):
      t = jnp.broadcast_to(t, (b,))
      _, inter = _apply(policy, params, obs, kv, prefix_mask, x_t, t, method=Pi0.velocity)
      v, inter_ref = _apply(policy, reference, obs, kv_ref, mask_ref, x_t, t, method=Pi0.velocity)
      return x_t + dt * v, _moments(inter, inter_ref, experts)

    _, steps = jax.lax.scan(step, noise, flow_times(num_steps))
  return _add(prefix, {p: jax.tree.map(lambda a: a.sum(axis=0), m) for p, m in steps.items()})


def attention_moments(policy: Policy, params: Params, reference: Params, batches, *,
                      rng: jax.Array, experts: tuple[int, ...] = (1,),
                      num_steps: int = 10) -> dict[str, AttentionMoments]:
  """The attention statistics that `balance_attention` matches, of `params` against `reference`.

  Every batch runs the prefix pass and `num_steps` flow steps of both trees on the same
  observations and the same x_t: the reference's own flow trajectory from x_1 ~ N(0, I).

  Args:
    policy: the `Policy` (run with its `PackedRuntime`, or the default one if its runtime is
      float). params: the float or packed tree measured. reference: the tree compared
      against, whose trajectory the flow steps follow (the FP params; `params` itself for the FP
      policy's own statistics).
    batches: an `Observation` with leading axes (stream, B, ...), as for `calibrate`.
    rng: key; batch g draws its flow noise x_1 from fold_in(rng, g).
    experts: Gemma experts to measure (0: the LLM in the prefix pass; 1: the action expert over
      the flow steps).
    num_steps: flow steps per batch.

  Returns:
    {q weight path: moments of the row-centred logits q.k / sqrt(H) over the valid keys, per layer
     and query head (L, N); attention output weight path: moments of its output per layer (L, 1)},
    summed over the batches and flow steps.

  Raises:
    ValueError: bad batches (as `calibrate`), or an expert the trees do not have.
  """
  g, b = validate_batches(batches, policy.cfg)
  policy = _packed_runtime(policy)
  first = jax.tree.map(lambda x: jnp.asarray(x[0]), batches)
  policy._check(params, first)
  policy._check(reference, first)
  _check_experts(params, experts)
  _check_experts(reference, experts)
  totals: dict = {}
  for i in range(g):
    obs = jax.tree.map(lambda x: jnp.asarray(x[i]), batches)
    noise = jax.random.normal(jax.random.fold_in(rng, i),
                              (b, policy.cfg.action_horizon, policy.cfg.action_dim))
    totals = _add(totals, _batch_moments(policy, params, reference, obs, noise,
                                         experts=tuple(experts), num_steps=num_steps))
  return dict(sorted(totals.items()))


# ------------------------------------------------------------------------------------------------
# The fold.


def _scale_float(w: jax.Array, layout, s: jax.Array) -> jax.Array:
  """w (stack..., weight) with output channel group p of each stacked layer multiplied by s[..., p]."""
  spec = layout.w_spec
  contract = layout.contract_letters
  outs = [c for c in spec if c not in contract]
  sizes = dict(zip(spec, layout.weight_shape))
  n = math.prod(sizes[c] for c in outs)
  full = jnp.repeat(s.astype(jnp.float32), n // s.shape[-1], axis=-1)  # (stack..., N_out)
  full = full.reshape(s.shape[:-1] + tuple(sizes[c] for c in outs))
  # Broadcast over the contraction axes at their places in the weight's own axis order.
  lead = layout.num_stack
  for i, c in enumerate(spec):
    if c in contract:
      full = jnp.expand_dims(full, lead + i)
  return (jnp.asarray(w, jnp.float32) * full).astype(jnp.asarray(w).dtype)


def _scale_packed(w: PackedLinear, path: str, s: jax.Array) -> PackedLinear:
  n = w.out_features
  group = n // s.shape[-1]
  if w.out_rot is not None and group % w.out_rot.shape[-1]:
    raise NotImplementedError(f"{path}: output rotation blocks of {w.out_rot.shape[-1]} channels "
                              f"straddle the {s.shape[-1]} scale groups of {group} channels")
  full = jnp.repeat(s.astype(jnp.float32), group, axis=-1)[..., None]  # (stack..., N_out, 1)
  scale = (w.scale.astype(jnp.float32) * full).astype(w.scale.dtype)
  return w.replace(scale=scale)


def scale_outputs(params: Params, scales: Mapping[str, jax.Array]) -> Params:
  """Multiplies output channels of linears by per-group scalars, folded into their weights.

  Args:
    params: a float or packed openpi-layout param tree (not modified).
    scales: {weight path: s (stack..., P)}: the linear's output channels, in its 2-D view's order
      (the weight's non-contracted axes in weight order: q's (N, H), the attention output's D),
      split into P equal contiguous groups; group p of stacked layer l is multiplied by s[l, p].
      P = N scales q per head; P = 1 scales a whole layer.

  Returns:
    The tree with each listed weight scaled: a float weight in its dtype, a `PackedLinear` through
    its scales (exact up to their storage rounding).

  Raises:
    ValueError: a path that is not a linear of the tree, a scale shape that does not fit it, or
      non-finite or non-positive scales.
    NotImplementedError: a packed output rotation whose blocks straddle two scale groups.
  """
  # Layouts from shapes: a packed weight stands for a float weight of its `shape`.
  layouts = linear_layouts(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params,
      is_leaf=lambda x: isinstance(x, PackedLinear)))
  out = copy_dicts(params)
  for path, s in sorted(scales.items()):
    if path not in layouts or not has_path(params, path):
      raise ValueError(f"scale_outputs: {path!r} is not a linear weight of this tree")
    lay = layouts[path]
    s = jnp.asarray(s, jnp.float32)
    if s.ndim != lay.num_stack + 1 or s.shape[:-1] != lay.stack_shape or (
        s.shape[-1] < 1 or lay.out_features % s.shape[-1]):
      raise ValueError(f"scale_outputs: {path}: {s.shape=} does not fit stack {lay.stack_shape} x "
                       f"groups dividing N_out={lay.out_features}")
    if not bool(jnp.all(jnp.isfinite(s) & (s > 0))):
      raise ValueError(f"scale_outputs: {path}: scales must be finite and positive, got "
                       f"min {float(jnp.min(s))}, max {float(jnp.max(s))}")
    w = get_path(params, path)
    set_path(out, path, _scale_packed(w, path, s) if isinstance(w, PackedLinear)
             else _scale_float(w, lay, s))
  return out


# ------------------------------------------------------------------------------------------------
# Calibration.


def _scales(moments: dict, paths: list[str], fit: str) -> dict[str, jax.Array]:
  out = {}
  for p in paths:
    s = moments[p].scale(fit)
    bad = ~(jnp.isfinite(s) & (s > 0))
    if bool(jnp.any(bad)):
      layer = int(np.argwhere(np.asarray(bad))[0][0])
      raise ValueError(f"balance_attention: {p} layer {layer}: no usable statistic (scales "
                       f"{np.asarray(s)[layer]}: FP RMS {np.asarray(moments[p].reference_rms)[layer]}"
                       f", packed RMS {np.asarray(moments[p].rms)[layer]})")
    out[p] = s
  return out


def balance_attention(policy: Policy, params: Params, packed: Params, batches, cfg: QuantConfig,
                      *, rng: jax.Array) -> tuple[Params, dict[str, jax.Array]]:
  """Attention temperature matching and output balancing of a packed policy (module docstring).

  Args:
    policy: the `Policy`. params: the FP param tree. packed: `quantize_params(params, cfg, ...)`.
    batches: calibration observations with leading axes (stream, B, ...), as for `calibrate`.
    cfg: the QuantConfig `packed` was made with; `cfg.attention_balance` says which levers, for
      which experts (None: nothing to do). Under `rotate_residual` the FP reference is the rotated
      float model (`quantize.rotated_model`), in the basis of the packed outputs.
    rng: key of the flow noise (batch g: fold_in(rng, g)); the same for every pass.

  Returns:
    (the packed tree with the scalars folded into the q and attention output weights, {weight
     path: the folded scalars, (L, N) per q head and (L, 1) per output projection}).

  Raises:
    ValueError: bad batches, an expert the model lacks, a statistic that is zero or not finite.

  Example:
    cfg = dataclasses.replace(get_preset("recommended"), attention_balance=AttentionBalance())
    packed = quantize_params(params, cfg, stats)
    packed, scalars = balance_attention(policy, params, packed, batches, cfg, rng=key)
  """
  ab = cfg.attention_balance
  if ab is None:
    return packed, {}
  _check_experts(params, ab.experts)
  _check_experts(packed, ab.experts)
  reference, _ = rotated_model(params, cfg)
  stat = functools.partial(attention_moments, policy, reference=reference, batches=batches,
                           rng=rng, experts=ab.experts, num_steps=ab.num_steps)
  q_paths = [attention_paths(e)[0] for e in ab.experts]
  o_paths = [attention_paths(e)[1] for e in ab.experts]
  folded: dict[str, jax.Array] = {}
  if ab.temperature:
    tau = _scales(stat(packed), q_paths, ab.fit)
    packed = scale_outputs(packed, tau)
    folded.update(tau)
  if ab.output:  # measured with the temperatures folded
    beta = _scales(stat(packed), o_paths, ab.fit)
    packed = scale_outputs(packed, beta)
    folded.update(beta)
  return packed, folded
