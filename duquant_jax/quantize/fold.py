"""Step 3 of `quantize_params`: where a group's smoothing goes, and reading it back.

The smoothing x -> x / lam (DuQuant's, after SmoothQuant) costs nothing at run time where it folds
into the op producing the input:
- a norm: RMSNorm (1 + s) -> (1 + s) / lam; LayerNorm scale and bias / lam; pi0.5's adaptive
  RMSNorm, whose (scale, shift, gate) come from a Dense: its scale and shift columns / lam;
- Gemma's down projection, which reads gelu(gate) * up: the up half of the producing
  `gating_einsum` / lam (exact);
- elsewhere it merges into the online transform (its first rotation).
Every member's weight gets diag(lam) when the transform is folded into it at packing. A float
member of a smoothed group (no rule) sees the smoothed input too, so its input rows are scaled
by lam.

`fold_smoothing` returns the new leaves rather than writing them; `folded_smoothing` and
`producer_smoothing` read lam back from a packed tree (the evaluation and the diagnostics undo it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from duquant_jax.config import LayerRule
from duquant_jax.layouts import LinearLayout
from duquant_jax.openpi_paths import ADARMS_DENSE
from duquant_jax.packed import PackedLinear
from duquant_jax.quantize.plan import GroupPlan, stats_for
from duquant_jax.quantize.transform import shape_key, store, w_absmax_in, weight_array
from duquant_jax.transforms import InputTransform, smoothing_factors
from duquant_jax.treepath import get_path

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Folded:
  """What `fold_smoothing` decided for one group.

  `updates`: {param path: new leaf} to write into the tree (norms, producers, float members),
  each in its leaf's own dtype. `online`: the transform the packed weights apply to their input
  at run time (None: nothing online). `fold`: the transform folded into the weights at packing
  (the online one plus what went offline).
  """

  updates: dict[str, jax.Array]
  online: Optional[InputTransform]
  fold: Optional[InputTransform]


def fold_smoothing(tree: Params, plan: GroupPlan, transform: Optional[InputTransform],
                   lam: Optional[jax.Array], weights: Mapping[str, Any]) -> Folded:
  """Decides where one group's smoothing lam goes and computes the leaves that receive it.

  Args:
    tree: the param tree as packed so far (earlier groups' folds applied); read only.
    plan: the group (`plan_group`); transform, lam: from `build_transform`.
    weights: each member's weight as the group reads it.

  Returns:
    Folded(updates, online, fold).

  Raises:
    ValueError: the smoothing would fold into a producer that is already packed.
  """
  layout0, lead = plan.layout0, plan.lead
  updates: dict[str, jax.Array] = {}
  online = fold = transform
  if transform is not None and lam is not None:
    if layout0.norm is None and layout0.producer is not None and transform.perm is None:
      # The smoothing leaves the online side; at most one block rotation stays there. (With a
      # permutation between two rotations, the smoothing merges into the first rotation at no
      # cost instead, as `recommended` packs it.)
      updates.update(fold_into_producer(tree, layout0, lam))
      online = transform.replace(smooth=None)
    elif layout0.norm is not None:
      updates.update(fold_into_norm(tree, layout0, lam))
      online = transform.replace(smooth=None)
      for m in plan.members:
        if plan.rules[m.path] is None:  # a float member of the group sees the smoothed input too
          w = weights[m.path]
          updates[m.path] = scale_input_rows(w, m, lam).astype(w.dtype)
    elif not (lead.compact and lead.rotation == "hadamard"):  # (generated blocks stay unmerged)
      # The online transform is the whole one: fold exactly what runs (its rotations rounded).
      online = fold = store(transform.merged(), lead)
  if online is not None and not any(online.hadamard) and all(
      getattr(online, f) is None for f in ("smooth", "rot1", "perm", "rot2")):
    online = None
  return Folded(updates=updates, online=online, fold=fold)


def fold_into_norm(tree: Params, layout: LinearLayout, lam: jax.Array) -> dict[str, jax.Array]:
  """The norm's leaves with its output divided by lam (stack..., K), in place of an online
  division: {path: leaf}.

  Computed in float32; each folded leaf is returned in its original dtype, so a bf16 model stays
  bf16 (pi0.5's adaptive-norm Dense kernels would otherwise double to float32: 0.21 GiB).
  """
  norm = layout.norm
  out: dict[str, jax.Array] = {}

  def get(path):
    return jnp.asarray(get_path(tree, path), jnp.float32)

  def put(path, value):
    out[path] = value.astype(get_path(tree, path).dtype)

  if layout.norm_kind == "rms":  # y = n * (1 + s)  ->  n * (1 + s) / lam
    put(f"{norm}/scale", (1.0 + get(f"{norm}/scale")) / lam - 1.0)
  elif layout.norm_kind == "layernorm":
    for leaf in ("scale", "bias"):
      put(f"{norm}/{leaf}", get(f"{norm}/{leaf}") / lam)
  elif layout.norm_kind == "adarms":  # y = n * (1 + scale) + shift, with (scale, shift, gate) = Dense
    d = lam.shape[-1]
    kern = get(f"{norm}/{ADARMS_DENSE}/kernel")
    bias = get(f"{norm}/{ADARMS_DENSE}/bias")
    inv = 1.0 / lam
    kern = jnp.concatenate([kern[..., :2 * d] * jnp.concatenate([inv, inv], -1)[..., None, :],
                            kern[..., 2 * d:]], axis=-1)
    bias = jnp.concatenate([(1.0 + bias[..., :d]) * inv - 1.0, bias[..., d:2 * d] * inv,
                            bias[..., 2 * d:]], axis=-1)
    put(f"{norm}/{ADARMS_DENSE}/kernel", kern)
    put(f"{norm}/{ADARMS_DENSE}/bias", bias)
  else:
    raise AssertionError(layout.norm_kind)
  return out


def fold_into_producer(tree: Params, layout: LinearLayout, lam: jax.Array) -> dict[str, jax.Array]:
  """Gemma's `gating_einsum` (stack..., 2, D, F) with its up half divided by lam (stack..., F), so
  the down projection's input gelu(gate) * (up / lam) carries the smoothing exactly: {path: leaf}.

  Raises:
    ValueError: the producer is already packed.
  """
  path = layout.producer
  w = get_path(tree, path)
  if not hasattr(w, "dtype"):
    raise ValueError(f"{layout.path}: its smoothing folds into {path}, which is already packed")
  w32 = jnp.asarray(w, jnp.float32)
  w32 = w32.at[..., 1, :, :].divide(lam[..., None, :])
  return {path: w32.astype(w.dtype)}


def scale_input_rows(w: jax.Array, layout: LinearLayout, lam: jax.Array) -> jax.Array:
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
# The inverse: the smoothing read back from a packed tree.


def folded_smoothing(params: Params, packed: Params, layout: LinearLayout) -> jax.Array:
  """The smoothing lam (stack..., K) that quantize_params folded into this linear's norm (else 1).

  Read back from the norm params: rms (1 + s) -> (1 + s) / lam; layernorm scale -> scale / lam;
  adaptive rms: the scale columns of the Dense kernel -> kernel / lam.
  """
  ones = jnp.ones(layout.stack_shape + (layout.in_features,), jnp.float32)
  if layout.norm is None:
    return ones
  f = lambda t, leaf: jnp.asarray(get_path(t, f"{layout.norm}/{leaf}"), jnp.float32)
  if layout.norm_kind == "rms":
    return (1.0 + f(params, "scale")) / (1.0 + f(packed, "scale"))
  if layout.norm_kind == "layernorm":
    return f(params, "scale") / f(packed, "scale")
  if layout.norm_kind == "adarms":
    d = layout.in_features
    kernel, bias = f"{ADARMS_DENSE}/kernel", f"{ADARMS_DENSE}/bias"
    if isinstance(get_path(packed, f"{layout.norm}/{kernel}"), PackedLinear):
      # The Dense itself was packed after the fold; its float bias carries lam too:
      # (1 + b) -> (1 + b) / lam.
      return (1.0 + f(params, bias)[..., :d]) / (1.0 + f(packed, bias)[..., :d])
    k0, k1 = f(params, kernel)[..., :d], f(packed, kernel)[..., :d]
    return jnp.sum(k0 * k0, axis=-2) / jnp.sum(k0 * k1, axis=-2)
  raise AssertionError(layout.norm_kind)


def adarms_dense_folded(params: Params, packed: Params, path: str) -> jax.Array:
  """The float kernel (stack..., C, 3D) of an adaptive norm's modulation Dense at `path`, with the
  smoothing that `fold_into_norm` put into its scale and shift columns: the weight its packed
  form quantizes (the Dense is packed after the fold). lam is read back from the float bias,
  which carries it: (1 + b) -> (1 + b) / lam; without a fold the kernel comes back as it is."""
  bias = path.rsplit("/", 1)[0] + "/bias"
  b0, b1 = (jnp.asarray(get_path(t, bias), jnp.float32) for t in (params, packed))
  kernel = jnp.asarray(get_path(params, path), jnp.float32)
  d = kernel.shape[-1] // 3
  inv = (1.0 + b1[..., :d]) / (1.0 + b0[..., :d])
  return kernel.at[..., :2 * d].multiply(jnp.concatenate([inv, inv], -1)[..., None, :])


def producer_smoothing(params: Params, packed: Params, layout: LinearLayout, rule: LayerRule,
                       stats: Any) -> Optional[jax.Array]:
  """The smoothing lam (stack..., F) that `quantize_params` folded into this linear's producer
  (`LinearLayout.producer`), or None if it folded none; from the float producer's up columns
  when it stayed float, else recomputed from the rule and stats as the packer did."""
  folds = rule is not None and rule.smooth_alpha is not None and rule.permutation == "none"
  if layout.producer is None or not folds:
    return None
  folded = get_path(packed, layout.producer)
  if not isinstance(folded, PackedLinear):
    u0 = jnp.asarray(get_path(params, layout.producer), jnp.float32)[..., 1, :, :]
    u1 = jnp.asarray(folded, jnp.float32)[..., 1, :, :]
    return jnp.sum(u0 * u0, axis=-2) / jnp.sum(u0 * u1, axis=-2)
  st = stats_for(stats, layout.path)
  w_absmax = w_absmax_in(weight_array(get_path(params, layout.path)), shape_key(layout))
  return smoothing_factors(jnp.asarray(st.absmax, jnp.float32), w_absmax, rule.smooth_alpha)
