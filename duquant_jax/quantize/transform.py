"""Step 2 of `quantize_params`: one group's DuQuant input transform, as it is stored.

Following DuQuant (Lin et al., "DuQuant: Distributing Outliers via Dual Transformation Makes
Stronger Quantized LLMs", NeurIPS 2024): smoothing lam = max|x|^a / max|W|^(1-a) from the
calibration stats and the group's weights, block rotation R1 (greedy, activation-aware),
zigzag permutation, block rotation R2, all batched over layers and blocks
(`transforms.build_duquant_transform`). Rotations are stored rounded (float16, or int8 codes
under `LayerRule.compact`); folding inverts the same rounded values exactly
(`InputTransform.fold`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.config import LayerRule
from duquant_jax.layouts import LinearLayout, to_2d
from duquant_jax.quantize.plan import GroupPlan
from duquant_jax.transforms import InputTransform, build_duquant_transform


def build_transform(plan: GroupPlan, weights: Mapping[str, Any]
                    ) -> tuple[Optional[InputTransform], Optional[jax.Array]]:
  """The group's input transform (stored form) and its smoothing lam (stack..., K).

  Args:
    plan: the checked group (`plan_group`).
    weights: each member's weight as the group reads it, jax or host arrays.

  Returns:
    (transform, lam): (None, None) where the lead rule transforms nothing; lam None without
    smoothing. The transform still holds its smoothing (`fold_smoothing` decides where it goes).
  """
  lead, layout0 = plan.lead, plan.layout0
  if not lead.transforms_input:
    return None, None
  w_absmax = None
  if lead.smooth_alpha is not None:
    w_absmax = functools.reduce(jnp.maximum, [w_absmax_in(weights[m.path], shape_key(m))
                                              for m in plan.active])
  absmax = plan.absmax
  if absmax is None:  # activation-free transform: only rotation / permutation by weights
    absmax = jnp.ones(layout0.stack_shape + (layout0.in_features,), jnp.float32)
  w_cat = None
  if lead.rotation.startswith("weight_"):
    ns = layout0.num_stack
    w2s = [jax.vmap(lambda a, m=m: to_2d(a, m))(weights[m.path]) if ns else to_2d(
        weights[m.path], m) for m in plan.active]
    w_cat = jnp.concatenate(w2s, axis=-1)
  transform = build_duquant_transform(
      plan.samples, absmax, w_absmax, block_size=lead.block_size, key=plan.key,
      alpha=lead.smooth_alpha, rotation=lead.rotation, permutation=lead.permutation,
      head_dim=plan.head_dim, w=w_cat, max_steps=lead.rotation_steps)
  lam = transform.smooth
  # Rotations are stored rounded; folding inverts the same rounded values exactly.
  return store(transform, lead), lam


def store(t: InputTransform, rule: LayerRule) -> InputTransform:
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


# ----------------------------------------------------------------------------------------------
# Weights as the packer reads them.


def shape_key(layout: LinearLayout) -> LinearLayout:
  """The layout without its path, so weights of equal shape and use share compiled programs."""
  return dataclasses.replace(layout, path="", norm=None, producer=None, shared=None)


@functools.partial(jax.jit, static_argnames="layout")
def _w_absmax_one(w: jax.Array, layout: LinearLayout) -> jax.Array:
  """max |W| over the output axes of one layer, in the weight's own layout and dtype (exact), then
  ordered as `to_2d` orders the input channels: (K,) float32."""
  spec, contract = layout.w_spec, layout.contract_letters
  m = jnp.max(jnp.abs(w), axis=tuple(i for i, c in enumerate(spec) if c not in contract))
  kept = sorted(contract, key=spec.index)  # m's axes: the contraction axes in weight order
  m = jnp.transpose(m, tuple(kept.index(c) for c in contract))
  return m.reshape(layout.in_features).astype(jnp.float32)


def w_absmax_in(w: Any, layout: LinearLayout) -> jax.Array:
  """Per-input-channel max |W| (stack..., K), one stacked layer at a time (a float32 copy of a
  whole stacked weight can be gigabytes)."""
  if not layout.num_stack:
    return _w_absmax_one(on_device(w), layout)
  return jnp.stack([_w_absmax_one(on_device(w[i]), layout) for i in range(w.shape[0])])


def on_device(a: Any) -> jax.Array:
  """A jax array of `a`. Host arrays go through `jax.device_put`, which on the CPU aliases a
  64-byte aligned numpy buffer instead of copying it (`jnp.asarray` always copies): the packer
  reads each stacked layer of a host weight without a fresh copy (and its page faults)."""
  return a if isinstance(a, jax.Array) else jax.device_put(np.asarray(a))


def weight_array(w: Any) -> Any:
  """A weight as `quantize_params` works on it: jax arrays as they are (on their device); host
  arrays and lazily read leaves (`openpi_checkpoint.LazyLeaf`) as host numpy arrays, which the
  packer moves to the device one stacked layer at a time."""
  return w if isinstance(w, jax.Array) else np.asarray(w)
