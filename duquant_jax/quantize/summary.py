"""What a packed tree holds: quantized layers and their bytes against bf16 (`summarize`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax import openpi_paths
from duquant_jax.embedding import is_packed
from duquant_jax.packed import PackedLinear, tree_nbytes
from duquant_jax.treepath import flat_items

Params = dict[str, Any]


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
  """Linears a packed weight holds: its stacked layers, times 2 for openpi's (k, v) and (gate, up)
  pairs (`openpi_paths.pairs_per_weight`)."""
  per_layer = openpi_paths.pairs_per_weight(path)
  return per_layer * int(np.prod(shape[:num_stack], dtype=np.int64))


def summarize(packed: Params) -> PackSummary:
  """Counts quantized layers and their bytes (bf16 vs packed) in a packed tree.

  Works on concrete arrays and on `jax.eval_shape` outputs (ShapeDtypeStructs) alike.
  """
  layers = fp = pk = 0
  bits = {}
  items = packed_items(packed)
  for path, leaf in items:
    if isinstance(leaf, PackedLinear):
      layers += _logical_linears(path, leaf.shape, leaf.codes.ndim - 2)
    fp += 2 * math.prod(leaf.shape)
    pk += leaf.nbytes()
    bits[path] = 32 if leaf.bits is None else leaf.bits  # None: a transforms-only float32 weight
  # Everything else: float leaves at bf16 (2 bytes), integer / bool leaves as they are.
  packed_ids = {id(leaf) for _, leaf in items}
  rest = [x for x in jax.tree.leaves(packed, is_leaf=lambda n: id(n) in packed_ids)
          if id(x) not in packed_ids]
  rest_bytes = sum(2 * math.prod(x.shape) if jnp.issubdtype(x.dtype, jnp.floating)
                   else tree_nbytes(x) for x in rest)
  return PackSummary(layers_quantized=layers, weight_bytes_fp=fp, weight_bytes_packed=pk, bits=bits,
                     tree_bytes_bf16=fp + rest_bytes, tree_bytes_packed=pk + rest_bytes)


def packed_items(tree: Params) -> list[tuple[str, Any]]:
  """(path, PackedLinear | PackedEmbedding) for every packed tensor of a tree, in path order."""
  return [(p, x) for p, x in flat_items(tree, is_leaf=is_packed) if is_packed(x)]


