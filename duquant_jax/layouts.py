"""Declared layouts of every linear weight: which axes are stacked, contracted, output, and heads.

Layouts are declared from openpi's param paths and the einsum each weight is used with, never guessed
from shapes (D may equal F): the table is `duquant_jax.openpi_paths` (with the axis-letter legend).
Leading axes of a weight beyond the einsum's weight spec are stack axes: L, the `nn.scan` depth axis.

A linear's 2-D view: W2 (K_in, N_out) with K_in = product of the contraction axes and N_out = product
of the weight's other axes, both in the weight's own axis order; the packed weight stores W2.T as
(N_out, K_in) so the integer dot contracts the last axis of both operands.

Any other `.../kernel` of rank 2 (or rank 3 under a scanned prefix) is a flax `Dense` / NNX `Linear`
kernel (in, out): `...I,IO->...O`. Token embedding tables (V vocabulary, D width) are declared
separately (`EMBEDDING_TABLES`): they are read by a gather, not a matmul, and take weight-only
`EmbeddingRule`s.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal

import jax
import jax.numpy as jnp

from duquant_jax import openpi_paths
from duquant_jax.openpi_paths import EMBEDDING_TABLES, GEMMA_LAYERS, SIGLIP_BLOCK
from duquant_jax.treepath import flat_items

__all__ = ["DENSE_EQN", "EMBEDDING_TABLES", "GEMMA_LAYERS", "SIGLIP_BLOCK", "LinearLayout",
           "embedding_paths", "linear_layouts", "split_eqn", "to_2d", "to_2d_perm"]

_SCANNED_PREFIXES = (GEMMA_LAYERS + "/", SIGLIP_BLOCK + "/")
DENSE_EQN = "...I,IO->...O"


def split_eqn(eqn: str) -> tuple[str, str, str]:
  lhs, out = eqn.replace(" ", "").split("->")
  x, w = lhs.split(",")
  return x, w, out


@dataclasses.dataclass(frozen=True)
class LinearLayout:
  """How a linear weight of `shape` is used: its einsum, stack axes, norm and head structure."""

  path: str
  shape: tuple[int, ...]
  eqn: str
  norm: str | None  # path of the module whose output is this linear's input (for smoothing folds)
  norm_kind: Literal["rms", "adarms", "layernorm"] | None
  head_role: Literal["in", "out"] | None  # which side of the weight is split into attention heads
  head_dim: int | None
  # The weight whose output channels are this linear's input channels up to an elementwise
  # product that commutes with a per-channel scale (Gemma's down projection reads
  # gelu(gate) * up: its input channel k scales with column k of the up half of `gating_einsum`),
  # so smoothing folds there exactly; None where no such weight exists.
  producer: str | None = None
  # The shared-input group declared by the config (`QuantConfig.shared_inputs`), or None.
  shared: str | None = None

  @property
  def w_spec(self) -> str:
    return split_eqn(self.eqn)[1]

  @property
  def adarms_dense(self) -> str | None:
    """The kernel path of the Dense giving this linear's adaptive norm its modulation (pi0.5),
    where a smoothing fold lands; None for other norms."""
    return f"{self.norm}/{openpi_paths.ADARMS_DENSE}/kernel" if self.norm_kind == "adarms" else None

  @property
  def num_stack(self) -> int:
    return len(self.shape) - len(self.w_spec)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return self.shape[:self.num_stack]

  @property
  def weight_shape(self) -> tuple[int, ...]:
    """The shape of one layer's weight (without stack axes)."""
    return self.shape[self.num_stack:]

  @property
  def contract_letters(self) -> str:
    x, w, y = split_eqn(self.eqn)
    return "".join(c for c in w if c in x and c not in y)

  @property
  def in_features(self) -> int:
    """K: the product of the contraction axes."""
    spec = self.w_spec
    return math.prod(self.weight_shape[spec.index(c)] for c in self.contract_letters)

  @property
  def out_features(self) -> int:
    return math.prod(self.weight_shape) // self.in_features

  @property
  def group(self) -> str:
    """Linears with the same group read the same input (q / kv; SigLIP q / k / v; a generic
    model's groups declared in `QuantConfig.shared_inputs`)."""
    if self.shared is not None:
      return self.shared
    return self.norm if self.norm is not None else self.path


def to_2d_perm(w_spec: str, contract: str) -> tuple[int, ...]:
  """Axis permutation putting the contraction axes first (in weight order), then the others."""
  return tuple(w_spec.index(c) for c in contract) + tuple(
      i for i, c in enumerate(w_spec) if c not in contract)


def to_2d(w: jax.Array, layout: LinearLayout) -> jax.Array:
  """One layer's weight (as in the param tree, no stack axes) -> W2 (K, N) float32."""
  perm = to_2d_perm(layout.w_spec, layout.contract_letters)
  return jnp.transpose(w, perm).reshape(layout.in_features, layout.out_features).astype(jnp.float32)


def _dense_layout(path: str, shape: tuple[int, ...]) -> LinearLayout | None:
  scanned = path.startswith(_SCANNED_PREFIXES)
  # A root-level Dense (the module itself is the Dense) has the bare path `kernel`.
  if not (path == "kernel" or path.endswith("/kernel")) or len(shape) != 2 + scanned:
    return None
  if path.endswith("embedding/kernel"):  # the SigLIP patch conv is not a linear
    return None
  return LinearLayout(path=path, shape=shape, eqn="BI,IO->BO", norm=None, norm_kind=None,
                      head_role=None, head_dim=None)


def linear_layouts(params: Any) -> dict[str, LinearLayout]:
  """Every linear weight of an openpi-layout param tree (arrays or ShapeDtypeStructs), by path."""
  flat = dict((p, x) for p, x in flat_items(params))
  paths = set(flat)
  out = {}
  for path, x in flat.items():
    shape = tuple(getattr(x, "shape", ()))
    found = openpi_paths.match(path)
    if found is None:
      lay = _dense_layout(path, shape)
      if lay is not None:
        out[path] = lay
      continue
    site, groups = found
    norm = f"{groups['pre']}/{site.norm.format(sfx=groups['sfx'])}" if site.norm else None
    kind = None
    if norm is not None:
      if f"{norm}/scale" in paths and f"{norm}/bias" in paths:
        kind = "layernorm"
      elif f"{norm}/scale" in paths:
        kind = "rms"
      elif f"{norm}/{openpi_paths.ADARMS_DENSE}/kernel" in paths:
        kind = "adarms"
      else:
        norm = None
    w_spec = split_eqn(site.eqn)[1]
    if len(shape) < len(w_spec):
      raise ValueError(f"{path}: weight of shape {shape} has fewer axes than its einsum {site.eqn!r}")
    head_dim = shape[len(shape) - len(w_spec) + w_spec.index("H")] if site.head_role else None
    producer = (f"{groups['pre']}/{site.producer.format(sfx=groups['sfx'])}" if site.producer
                else None)
    out[path] = LinearLayout(path=path, shape=shape, eqn=site.eqn, norm=norm, norm_kind=kind,
                             head_role=site.head_role, head_dim=head_dim,
                             producer=producer if producer in paths else None)
  return out


def embedding_paths(params: Any) -> dict[str, tuple[int, ...]]:
  """Every declared token embedding table (V, D) of a param tree: {path: shape}.

  Raises:
    ValueError: a declared path holding something other than a rank-2 array.
  """
  out = {}
  for path, x in flat_items(params):
    if any(re.fullmatch(r, path) for r in EMBEDDING_TABLES):
      shape = tuple(getattr(x, "shape", ()))
      if len(shape) != 2:
        raise ValueError(f"{path}: an embedding table must be (V, D), got shape {shape}")
      out[path] = shape
  return out
