"""How flax's linear modules contract their input: the geometry a 2-D (K, N) view of a kernel runs.

flax `Dense`, `DenseGeneral` and `Einsum` (and NNX's `Linear`, `LinearGeneral`, `Einsum`) apply a
kernel to trailing axes of x. Code that replaces the kernel by a 2-D view, a packed weight run by
`duquant_jax.runtime` or a calibration tap (`duquant_jax.capture`), flattens those axes to K,
multiplies, and restores the feature axes; these helpers say how many axes and which features.
Nothing here knows a packed format.

Axes: K the contracted (flattened) width, N the flattened output features.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


# flax modules whose `kernel` is a linear weight that a 2-D view may replace.
LINEAR_MODULES = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def dense_contraction(module: nn.Module, x: jax.Array, args: tuple = (),
                      kwargs: dict | None = None) -> tuple[int, tuple[int, ...]]:
  """(how many trailing axes of x the kernel contracts, the output feature shape) of a call of a
  flax `Dense`, `DenseGeneral` or `Einsum` (the forms a 2-D packed view (K, N) can run).

  Raises:
    NotImplementedError: DenseGeneral contracting non-trailing axes (or with batch dims); an
      Einsum that is not `...I,IO->...O`-shaped (`einsum_contraction`).
  """
  if isinstance(module, nn.Dense):
    return 1, (module.features,)
  if isinstance(module, nn.DenseGeneral):
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    if not trailing_axes(axis, x.ndim) or module.batch_dims:
      raise NotImplementedError(f"{module.path}: packed DenseGeneral kernels need trailing "
                                f"contraction axes and no batch_dims ({module.axis=})")
    features = module.features if isinstance(module.features, tuple) else (module.features,)
    return len(axis), features
  eqn = (kwargs or {}).get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
  return einsum_contraction(eqn, tuple(module.shape), "/".join(module.path))


def trailing_axes(axis: Sequence[int], ndim: int) -> bool:
  """Whether `axis` names the trailing axes of an ndim-axis input (flax's DenseGeneral and NNX's
  LinearGeneral contract their axes sorted, so x's flattened trailing axes then line up with the
  kernel's flattened contraction axes)."""
  return sorted(a % ndim for a in axis) == list(range(ndim - len(axis), ndim))


def einsum_contraction(eqn: str, kernel_shape: tuple[int, ...],
                       where: str) -> tuple[int, tuple[int, ...]]:
  """(how many trailing axes of x the kernel contracts, the output feature shape) of
  `einsum(eqn, x, kernel)`, for the form a 2-D packed view runs: `...I,IO->...O`.

  Raises:
    NotImplementedError: other forms (x's trailing axes against the kernel's leading ones, and the
      kernel's other axes trailing the output in order), naming `where`.
  """
  lhs, ys = eqn.replace(" ", "").split("->")
  xs, ws = lhs.split(",")
  contract = "".join(c for c in ws if c in xs and c not in ys)
  out = ws[len(contract):]
  if (not xs.endswith(contract) or not ws.startswith(contract) or not ys.endswith(out)
      or any(c in xs for c in out)):
    raise NotImplementedError(f"{where}: a packed Einsum needs the form '...I,IO->...O' "
                              f"(trailing x axes against the kernel's leading axes), got {eqn!r}")
  return len(contract), tuple(kernel_shape[len(contract):])
