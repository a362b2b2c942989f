"""How the model applies its weights: the `Runtime` protocol, and `FloatRuntime`, the default.

The model's own code only multiplies float weights. Every Gemma weight goes through the policy's
runtime: `einsum(eqn, x, w, memo)` for each linear, `gated_mlp` for a whole Gemma MLP, `embed` for
the token table; a stored param that is not an array (any other object a runtime put in the tree)
is handed to the runtime's `weight` as it is, and each `module.apply` runs under the runtime's
`context()` (where it may intercept flax `Dense` calls) on the variables its `variables(params)`
lays out. The default runs plain float einsums; `duquant_jax.runtime.PackedRuntime` runs packed
(quantized) trees through the same hooks, so the model never imports a packed type.

Example:
  policy = Policy(get_config("pi0", "demo"))                          # float params
  policy = Policy(get_config("pi0", "demo"), runtime=PackedRuntime())  # packed (or float) params

Axes (openpi's): B batch, T tokens, D width, F MLP hidden width, V vocabulary, L layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager, Protocol

import jax
import jax.numpy as jnp

# The variable collection the Gemma layer scan broadcasts to every layer whole, instead of slicing
# its leading layer axis (`Runtime.variables` may put stacked weights there, read at a layer index).
STACKED = "stacked"


class Runtime(Protocol):
  """What the model asks of whatever applies its weights (duck-typed; a frozen, hashable object,
  since it is a field of the model's flax modules)."""

  def variables(self, params: Any) -> dict:
    """The param tree -> the variables `module.apply` runs on ({"params": ...}, and optionally
    the `STACKED` collection)."""

  def context(self) -> ContextManager:
    """Entered around each traced policy call (e.g. to intercept flax `Dense` kernels)."""

  def weight(self, stored: Any, broadcast: Any) -> Any:
    """A stored param that is not an array -> the weight the other hooks take. `broadcast`: the
    `STACKED` collection's entry of the same name, or None."""

  def einsum(self, eqn: str, x: jax.Array, w: Any, memo: dict | None = None) -> jax.Array:
    """`jnp.einsum(eqn, x, w)`. `memo`: a dict shared by the linears of one call site that read
    the same x (a Gemma attention's q and kv)."""

  def gated_mlp(self, w_gating: Any, w_linear: Any, x: jax.Array) -> jax.Array | None:
    """A whole Gemma MLP (x (B, T, D) -> (B, T, D)) in one fused form, or None: the model then
    runs it as two `einsum`s."""

  def embed(self, table: Any, tokens: jax.Array) -> jax.Array:
    """Rows of the token table (V, D) at tokens (B, T) -> (B, T, D), unscaled."""


@dataclasses.dataclass(frozen=True)
class FloatRuntime:
  """Float weights, applied as plain einsums in x's dtype (openpi's own arithmetic)."""

  def variables(self, params: Any) -> dict:
    return {"params": params}

  def context(self) -> ContextManager:
    return contextlib.nullcontext()

  def weight(self, stored: Any, broadcast: Any) -> Any:
    raise TypeError(f"a param of type {type(stored).__name__} where a float weight was expected; "
                    "run packed trees with "
                    "`Policy(cfg, runtime=duquant_jax.runtime.PackedRuntime())`")

  def einsum(self, eqn: str, x: jax.Array, w: Any, memo: dict | None = None) -> jax.Array:
    return jnp.einsum(eqn, x, jnp.asarray(w).astype(x.dtype))

  def gated_mlp(self, w_gating: Any, w_linear: Any, x: jax.Array) -> jax.Array | None:
    return None

  def embed(self, table: Any, tokens: jax.Array) -> jax.Array:
    return jnp.asarray(table)[(tokens,)]
