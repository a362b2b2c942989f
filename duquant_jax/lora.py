"""Merging openpi LoRA fine-tunes into their base weights, so they quantize like any checkpoint.

openpi (`src/openpi/models/lora.py`) adds low-rank branches to two Gemma modules. Axis letters as in
`duquant_jax.layouts` (B T S N K G H D F, L stacked layers), plus R the LoRA rank:

- `lora.Einsum(shape)` (the attention projections q / kv / attn_vec): params `w`, `lora_a`,
  `lora_b` beside each other. `lora_a` is `w`'s shape with its LAST axis replaced by R, `lora_b`
  with its axis -2 replaced by R. For `y = einsum(eqn, x, w)` the branch renames the weight's last
  letter to R in the weight and the output for `a`, and its second-to-last letter to R for `b`:

      q:        BTD,NDR->BTNR   then  BTNR,NRH->BTNH        (a batched per head N)
      attn_vec: BTNH,NHR->BTR   then  BTR,NRD->BTD          (b's N summed on its own)

  and adds `branch * s` with s = alpha / R, or alpha / sqrt(R) with rank-stabilised LoRA (rslora).
- `lora.FeedForward` (the MLP): `gating_einsum_lora_a` (2, D, R), `gating_einsum_lora_b` (2, R, F),
  `linear_lora_a` (F, R), `linear_lora_b` (R, D) beside `gating_einsum` / `linear`; the branch is
  `(x @ a) @ b` per half, with NO scaling (openpi's FeedForward ignores alpha).

The branch is linear in x, so it equals one weight delta in `w`'s own layout:
`delta = einsum(a_spec, b_spec -> w_spec)` after summing `b` over the letters that only `b` carries
(N for attn_vec). `merge_lora` adds `s * delta` to `w` (in float32, stored back in `w`'s dtype) and
drops the LoRA leaves; `quantize_params` then sees a plain openpi tree.

openpi's defaults: `gemma_2b_lora` rank 16 / alpha 16, `gemma_300m_lora` rank 32 / alpha 32, so the
attention scaling is 1.0; `LoraSpec(alpha=None)` uses alpha = rank for that reason.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from typing import Any, Mapping, Optional

import numpy as np

from duquant_jax.layouts import linear_layouts, split_eqn
from duquant_jax.treepath import copy_dicts, flat_items, get_path, set_path

__all__ = ["LoraSpec", "LoraWeight", "find_lora", "lora_delta", "merge_lora"]

# openpi's module kinds: an Einsum keeps `lora_a` / `lora_b` beside `w`; a FeedForward keeps
# `<name>_lora_a` / `<name>_lora_b` beside `<name>`.
_EINSUM_SUFFIX = re.compile(r"(?P<base>.*)/lora_(?P<ab>[ab])")
_FFN_SUFFIX = re.compile(r"(?P<base>.*/(gating_einsum|linear))_lora_(?P<ab>[ab])")
RANK = "R"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSpec:
  """How the fine-tune's attention branches were scaled (openpi's `LoRAConfig`)."""

  # LoRA alpha, or None for alpha = rank (openpi's gemma_2b_lora / gemma_300m_lora: scaling 1.0).
  alpha: Optional[float] = None
  # Rank-stabilised LoRA: scaling alpha / sqrt(rank) instead of alpha / rank.
  rslora: bool = False

  def __post_init__(self):
    if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
      raise ValueError(f"LoRA alpha must be a positive number or None, got {self.alpha!r}")

  def scaling(self, rank: int) -> float:
    alpha = float(rank) if self.alpha is None else float(self.alpha)
    return alpha / math.sqrt(rank) if self.rslora else alpha / rank


@dataclasses.dataclass(frozen=True)
class LoraWeight:
  """One base weight with a LoRA branch: the paths of its three leaves and how it is scaled."""

  path: str  # the base weight
  a: str
  b: str
  eqn: str  # the base weight's einsum (declared in `duquant_jax.layouts`)
  num_stack: int  # leading stack axes (L) of w, a and b
  rank: int
  scaled: bool  # lora.Einsum (alpha / rank) or lora.FeedForward (unscaled)


def _letters(eqn: str) -> dict[str, str]:
  """Maps every non-letter axis name of `eqn` ('2' for the (k, v) pair) to a free letter."""
  used = set(c for c in eqn if c.isalpha()) | {RANK}
  free = (c for c in string.ascii_uppercase + string.ascii_lowercase if c not in used)
  return {c: next(free) for c in dict.fromkeys(eqn) if not c.isalpha() and c not in ",->."}


def lora_delta(eqn: str, a: Any, b: Any, *, num_stack: int = 0) -> np.ndarray:
  """The weight delta (float32, `w`'s layout) whose einsum equals openpi's two-step LoRA branch.

  Args:
    eqn: the base weight's einsum 'x,w->y' (e.g. 'BTD,NDH->BTNH').
    a: lora_a (stack..., w's shape with its last axis -> R).
    b: lora_b (stack..., w's shape with its axis -2 -> R).
    num_stack: leading stack axes shared by a and b (applied layer by layer).

  Returns:
    delta (stack..., w's shape), unscaled.

  Raises:
    NotImplementedError: an einsum whose weight's last axis is not an output axis (openpi builds
      no LoRA branch for it).
  """
  rename = _letters(eqn)
  x, w, y = (s.translate(str.maketrans(rename)) for s in split_eqn(eqn))
  a_label, b_label = w[-2], w[-1]
  if b_label not in y:
    raise NotImplementedError(f"{eqn}: LoRA needs the weight's last axis in the output")
  a_spec = w.replace(b_label, RANK)
  a_out = y.replace(b_label, RANK)
  b_spec = w.replace(a_label, RANK)
  own = "".join(c for c in b_spec if c not in a_out and c not in y)  # summed over b alone
  b_kept = "".join(c for c in b_spec if c not in own)
  free = [c for c in string.ascii_lowercase if c not in x + w + y]
  stack = "".join(free[:num_stack])
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  if own:
    b = b.sum(axis=tuple(num_stack + b_spec.index(c) for c in own))
  return np.einsum(f"{stack}{a_spec},{stack}{b_kept}->{stack}{w}", a, b)


def find_lora(params: Any) -> dict[str, LoraWeight]:
  """Every base weight with LoRA leaves in an openpi tree (arrays or shape structs), by path.

  Raises:
    ValueError: a lora_a without its lora_b (or the reverse), a LoRA leaf without its base weight,
      a base weight whose einsum is not declared, or shapes that do not fit the base weight.
  """
  flat = dict(flat_items(params))
  found: dict[str, dict[str, str]] = {}
  for path in flat:
    m = _FFN_SUFFIX.fullmatch(path) or _EINSUM_SUFFIX.fullmatch(path)
    if m is None:
      continue
    base = m["base"] if _FFN_SUFFIX.fullmatch(path) else f"{m['base']}/w"
    found.setdefault(base, {})[m["ab"]] = path
  if not found:
    return {}
  plain = {p: x for p, x in flat.items() if not any(p in d.values() for d in found.values())}
  layouts = linear_layouts(plain)
  out = {}
  for base, ab in sorted(found.items()):
    if set(ab) != {"a", "b"}:
      have = next(iter(ab.values()))
      raise ValueError(f"{have}: LoRA leaf without its lora_{'b' if 'a' in ab else 'a'}")
    if base not in flat:
      raise ValueError(f"{ab['a']}: LoRA leaves without their base weight {base}")
    if base not in layouts:
      raise ValueError(f"{base}: has LoRA leaves but no declared einsum (not a known linear)")
    lay = layouts[base]
    ws, sa, sb = (tuple(flat[p].shape) for p in (base, ab["a"], ab["b"]))
    rank = sa[-1] if len(sa) == len(ws) else -1
    exp_a, exp_b = ws[:-1] + (rank,), ws[:-2] + (rank, ws[-1])
    if rank < 1 or sa != exp_a or sb != exp_b:
      raise ValueError(f"{base}: LoRA shapes do not fit the weight {ws}: lora_a {sa}, lora_b {sb} "
                       f"(expected {exp_a} and {exp_b} for rank {rank})")
    out[base] = LoraWeight(path=base, a=ab["a"], b=ab["b"], eqn=lay.eqn, num_stack=lay.num_stack,
                           rank=rank, scaled=not _FFN_SUFFIX.fullmatch(ab["a"]))
  return out


def merge_one(w: Any, a: Any, b: Any, lw: LoraWeight, spec: LoraSpec) -> np.ndarray:
  """w + s * delta for one weight, computed in float32 and returned in w's dtype."""
  s = spec.scaling(lw.rank) if lw.scaled else 1.0
  w = np.asarray(w)
  if lw.num_stack == 0:
    return (np.asarray(w, np.float32) + s * lora_delta(lw.eqn, a, b)).astype(w.dtype)
  # One stacked layer at a time: a float32 copy of a whole stack can be gigabytes.
  a, b = np.asarray(a), np.asarray(b)
  flat = lambda t: t.reshape((-1,) + t.shape[lw.num_stack:])
  out = np.empty(w.shape, w.dtype)
  for o, wl, al, bl in zip(flat(out), flat(w), flat(a), flat(b)):
    o[...] = (np.asarray(wl, np.float32) + s * lora_delta(lw.eqn, al, bl)).astype(w.dtype)
  return out


def merge_lora(params: Mapping, spec: LoraSpec = LoraSpec()) -> dict:
  """The tree with every LoRA branch merged into its base weight and the LoRA leaves removed.

  Pure: `params` is not modified. A tree without LoRA leaves comes back as a copy of its dicts.

  Raises:
    ValueError: as `find_lora`.
  """
  found = find_lora(params)
  out = copy_dicts(params)
  for base, lw in found.items():
    merged = merge_one(get_path(params, base), get_path(params, lw.a), get_path(params, lw.b), lw,
                       spec)
    set_path(out, base, merged)
    for leaf in (lw.a, lw.b):
      parent, key = leaf.rsplit("/", 1)
      del get_path(out, parent)[key]
  return out
