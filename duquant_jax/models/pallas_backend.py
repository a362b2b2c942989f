"""The Pallas Triton backend, imported when a kernel is first traced: its module moved between
jax versions, and importing it at module level would make every import of the package need the
GPU-only parts of jax."""

from __future__ import annotations

import jax


def triton_api():
  """`jax.experimental.pallas.triton`, or NotImplementedError naming the jax version."""
  try:
    from jax.experimental.pallas import triton as plgpu
  except ImportError as e:  # pragma: no cover - depends on the jax version
    raise NotImplementedError(f"Pallas Triton backend unavailable in jax {jax.__version__}") from e
  return plgpu
