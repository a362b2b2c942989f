"""Dispatch as data: tables of shape regimes -> implementation, and the platform they are read on.

Each op module (`w4a8`, `gated`, `weight_only`, `transform_quantize`) states its auto-dispatch as
an ordered tuple of `Rule`s; `choose` returns the implementation of the first rule whose platform
and shape regime match, else the table's fallback (the XLA path). Why each threshold has its
value, and the measurement that set it, is in docs/kernels.md under the rule's `regime`.

Two platforms take part, decided at different times:
  - the device class at trace time (`platform()`): "cpu" (any backend without a GPU: CPU, TPU),
    "cuda-hopper" (an NVIDIA GPU of compute capability 9.x) or "cuda-other" (any other GPU
    backend). A rule names the classes it applies on;
  - the platform the trace is lowered for: a kernel that a table picks runs only where the
    function is lowered for CUDA (`on_cuda`); lowered for anything else, the same trace runs the
    fallback. So a table's answer is what runs on CUDA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

CPU = "cpu"
HOPPER = "cuda-hopper"
OTHER_GPU = "cuda-other"
PLATFORMS = frozenset({CPU, HOPPER, OTHER_GPU})


def platform() -> str:
  """The trace-time device class of the default device: CPU, HOPPER or OTHER_GPU."""
  if jax.default_backend() != "gpu":
    return CPU
  cc = str(getattr(jax.devices()[0], "compute_capability", ""))
  return HOPPER if cc.startswith("9") else OTHER_GPU


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
  """The shape facts a rule may read: (M, K) activations against (N, K) codes with G groups.

  Attributes:
    m: tokens (rows of the activations).
    k: input channels.
    n: output channels (0 for an op without a weight).
    g: scale groups along K (1: per output channel).
    codes: the weight codes' dtype, or None for an op without a weight.
  """
  m: int
  k: int
  n: int = 0
  g: int = 1
  codes: Any = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
  """One row of a dispatch table.

  Attributes:
    regime: the shape regime's name, the heading docs/kernels.md explains it under.
    platforms: the trace-time device classes the rule applies on (a subset of PLATFORMS).
    when: predicate on a `Problem`: whether the shape is in the regime (and the kernel takes it).
    implementation: what runs when the rule matches (lowered for CUDA; see the module docstring).
  """
  regime: str
  platforms: frozenset
  when: Callable[[Problem], bool]
  implementation: str

  def __post_init__(self):
    if not self.platforms or not self.platforms <= PLATFORMS:
      raise ValueError(f"Rule {self.regime!r}: platforms {set(self.platforms)} must be a "
                       f"non-empty subset of {set(PLATFORMS)}")


def choose(table: tuple[Rule, ...], problem: Problem, on: str | None = None,
           fallback: str = "xla") -> str:
  """The implementation of the first rule of `table` matching `problem` on platform `on`.

  Args:
    table: ordered rules; the first match wins.
    problem: the call's shapes.
    on: a name of PLATFORMS, or None for `platform()`.
    fallback: returned when no rule matches.

  Returns:
    A rule's implementation, or `fallback`.
  """
  on = platform() if on is None else on
  for rule in table:
    if on in rule.platforms and rule.when(problem):
      return rule.implementation
  return fallback


def on_cuda(kernel: Callable[[], jax.Array], fallback: Callable[[], Any]):
  """`kernel()` where the trace is lowered for CUDA, `fallback()` where it is lowered elsewhere."""
  return jax.lax.platform_dependent(cuda=kernel, default=fallback)


def check_stacked(q: jax.Array, sw: jax.Array) -> None:
  """Refuses a layer index for codes / scales without exactly one stack axis.

  Raises:
    ValueError: q is not (L, N, K) or sw is not (L, N, G).
  """
  if q.ndim != 3 or sw.ndim != 3:
    raise ValueError(f"a layer index needs stacked (L, N, K) codes and (L, N, G) scales, got "
                     f"{q.shape} and {sw.shape}")


def at_layer(layer: jax.Array | None, *arrays):
  """The arrays' slices at `layer` (None entries stay None); the arrays as they are without one."""
  if layer is None:
    return arrays
  return tuple(None if a is None else a[layer] for a in arrays)


def act_at_layer(layer: jax.Array | None, sx: jax.Array, zx: jax.Array | None):
  """Activation scales / zero points at `layer` when they are per tensor and stacked, (L, 1, 1)
  (one static quantizer per layer); every other form as it is.

  Raises:
    ValueError: stacked scales without a layer index.
  """
  if sx.ndim != 3:
    return sx, zx
  if layer is None:
    raise ValueError(f"per-layer activation scales {sx.shape} need a layer index")
  return sx[layer], None if zx is None else zx[layer]


def per_token(layer: jax.Array | None, sx: jax.Array, zx: jax.Array | None, m: int):
  """Activation scales / zero points of any form (`act_at_layer`) as (M, 1) per-token columns,
  for the kernels that read one scale per token."""
  sx, zx = act_at_layer(layer, sx, zx)
  return jnp.broadcast_to(sx, (m, 1)), None if zx is None else jnp.broadcast_to(zx, (m, 1))
