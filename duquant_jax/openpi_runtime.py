"""Running packed param trees in openpi's own model code (openpi's `Pi0` / pi0.5, unchanged).

openpi's Gemma applies its weights through linen modules that create their params by shape, and
flax checks an existing param against that shape, so a packed leaf (codes, scales, transform)
stops the model at the first `self.param`. This module routes those modules' methods to the
packed weights instead, by module contract (the param names a module owns), never by class:

| contract (openpi module)        | its params                              | runs, when packed   |
|---------------------------------|-----------------------------------------|---------------------|
| einsum (`lora.Einsum`)          | w; LoRA: lora_a, lora_b                 | runtime.einsum      |
| gated MLP (`lora.FeedForward`)  | gating_einsum (2, D, F), linear (F, D)  | linear(gelu(x gate) |
|                                 | LoRA: {gating_einsum,linear}_lora_{a,b} |   * (x up))         |
| embedder (`gemma.Embedder`)     | input_embedding (V, D), read by encode  | lookup * sqrt(D)    |
| flax `Dense` / `DenseGeneral`   | kernel, bias (SigLIP, adaRMSNorm)       | packed_interceptor  |

A packed weight is a `PackedLinear` (a `PackedEmbedding` for the token table). Axes (openpi's
legend): B batch, T tokens, N heads, K kv heads, H head dim, D width, F MLP hidden,
V vocabulary. A module whose contract param is packed skips its `setup()` (which would create the
params by shape) and runs here; modules with float params run their own code. The model itself is
NNX holding the linen Gemma and SigLIP through `nnx_bridge.ToNNX`, whose variables carry packed
leaves as they are; `load_into_openpi` is openpi's `BaseModelConfig.load` with a structure check
that sees a packed weight as the one float weight it replaces.

Example:
  model = load_into_openpi(pi0_config, packed)      # packed = duquant_jax.load_packed(...)
  with run_packed_in_openpi():                       # around the call that traces
    actions = model.sample_actions(rng, observation)

DuQuant: Lin et al., NeurIPS 2024; the packed math is `duquant_jax.runtime`'s.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from duquant_jax import runtime
from duquant_jax.embedding import PackedEmbedding, is_packed
from duquant_jax.treepath import flat_items
from duquant_jax.packed import PackedLinear
from duquant_jax.runtime import AUTO, Execution

# Contract params: a module owning one of these as a packed leaf runs here.
_EINSUM = ("w",)
_GATED_MLP = ("gating_einsum", "linear")
_EMBEDDER = ("input_embedding",)
_GATING_EQN, _DOWN_EQN = "BTD,2DF->2BTF", "BTF,FD->BTD"  # openpi's `jnp.dot`s as einsums


class InputMemo:
  """Shares one quantized input among consecutive packed calls on the same array.

  openpi's q / kv einsums (and SigLIP's query / key / value) read the same x one after another;
  a packed input group then quantizes x once (`runtime.shared_matmul`). Entries are dropped as soon
  as a call reads another array, so the memo holds at most one input's quantization.
  """

  def __init__(self):
    self._source, self._entries = None, {}

  def for_input(self, x: jax.Array) -> dict:
    if x is not self._source:
      self._source, self._entries = x, {}
    return self._entries


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.scope.path) or type(module).__name__


def _packed_params(module: nn.Module) -> dict[str, Any]:
  """{name: leaf} of the module's contract params that are packed."""
  if module.scope is None:
    return {}
  out = {}
  for name in _EINSUM + _GATED_MLP + _EMBEDDER:
    if module.has_variable("params", name):
      value = module.get_variable("params", name)
      if is_packed(value):
        out[name] = value
  return out


def _refuse_lora(module: nn.Module, packed: dict[str, Any]) -> None:
  """A LoRA branch adds x A B to x W: with W packed it must be merged into W before quantizing."""
  params = module.variables.get("params", {})
  lora = sorted(k for k in params if "lora" in k)
  if lora or getattr(module, "lora_config", None) is not None:
    raise ValueError(
        f"{_path(module)}: LoRA params {lora or '(lora_config set)'} beside packed "
        f"{sorted(packed)}; merge LoRA into the base weights before quantizing")


def _run_einsum(module, packed, args, kwargs, memo: InputMemo | None,
                execution: Execution) -> jax.Array:
  w = packed["w"]
  if not isinstance(w, PackedLinear):
    raise TypeError(f"{_path(module)}/w: a {type(w).__name__} is not an einsum weight")
  if args and isinstance(args[0], str):  # openpi: __call__(eqn, x)
    eqn, x = args[0], args[1] if len(args) > 1 else kwargs.get("x")
  else:  # the equation as a module attribute
    eqn, x = kwargs.get("eqn", getattr(module, "eqn", None)), args[0] if args else kwargs.get("x")
  if not isinstance(eqn, str) or x is None:
    raise ValueError(f"{_path(module)}/w is packed but its module was called without an einsum "
                     f"string and input (args {[type(a).__name__ for a in args]})")
  return runtime.einsum(w, eqn, x, execution, memo=None if memo is None else memo.for_input(x))


def _run_gated_mlp(module, params: dict[str, Any], x: jax.Array,
                   execution: Execution) -> jax.Array:
  """x (..., D) -> linear(gelu(x gate) * (x up)) (..., D), each weight packed or float."""
  w_gating, w_linear = params["gating_einsum"], params["linear"]
  for name, w in params.items():
    if isinstance(w, PackedEmbedding):
      raise TypeError(f"{_path(module)}/{name}: a PackedEmbedding is not an MLP weight")
  d = x.shape[-1]
  x3 = x.reshape(1, math.prod(x.shape[:-1]), d)  # BTD with all leading axes as T
  ops = runtime.PackedRuntime(execution)
  y = ops.gated_mlp(w_gating, w_linear, x3)  # the fused form where the packed format allows it
  if y is None:
    gate, up = ops.einsum(_GATING_EQN, x3, w_gating)
    y = ops.einsum(_DOWN_EQN, nn.gelu(gate) * up, w_linear)
  return y.reshape(x.shape[:-1] + (y.shape[-1],))


def openpi_interceptor(next_fun, args, kwargs, context, memo: InputMemo | None = None,
                       execution: Execution = AUTO):
  """`nn.intercept_methods` hook running openpi's linen modules on packed params.

  For a module whose contract param (table above) is a packed leaf: `setup` is skipped (it would
  create the params by shape) and `__call__` / `encode` run the packed weights read from the
  module's variables; flax `Dense` / `DenseGeneral` with a packed kernel run as
  `runtime.packed_interceptor`; everything else calls the original method. `memo`: an
  `InputMemo` shared by the calls of one traced model (None: each linear quantizes its own input).
  `execution`: which kernels run the packed weights (`runtime.Execution`).

  Raises:
    ValueError: LoRA params beside a packed weight; a packed einsum weight called without an
      einsum string.
    NotImplementedError: another method of a module holding packed params (e.g. `decode`).
    TypeError: a packed leaf of the wrong kind for its contract.
  """
  module, method = context.module, context.method_name
  packed = _packed_params(module)
  if not packed:
    if method == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)):
      x = args[0] if args else kwargs.get("inputs")
      return runtime.packed_interceptor(next_fun, args, kwargs, context,
                                        memo=None if memo is None else memo.for_input(x),
                                        execution=execution)
    return next_fun(*args, **kwargs)
  _refuse_lora(module, packed)
  if method == "setup":
    return None
  path = _path(module)
  if "w" in packed and method == "__call__":
    return _run_einsum(module, packed, args, kwargs, memo, execution)
  if set(packed) & set(_GATED_MLP) and method == "__call__":
    missing = [n for n in _GATED_MLP if not module.has_variable("params", n)]
    if missing:
      raise ValueError(f"{path}: packed {sorted(packed)} without {missing}: not a gated MLP")
    x = args[0] if args else kwargs["x"]
    return _run_gated_mlp(module, {n: module.get_variable("params", n) for n in _GATED_MLP}, x,
                          execution)
  if "input_embedding" in packed and method == "encode":
    table = packed["input_embedding"]
    if not isinstance(table, PackedEmbedding):
      raise TypeError(f"{path}/input_embedding: a {type(table).__name__} is not a token table")
    rows = runtime.lookup(table, args[0] if args else kwargs["x"])
    return rows * jnp.sqrt(table.shape[-1]).astype(rows.dtype)  # openpi's encode scaling
  raise NotImplementedError(f"{path}.{method}: not supported with packed {sorted(packed)}")


@contextlib.contextmanager
def run_packed_in_openpi(execution: Execution = AUTO) -> Iterator[None]:
  """Within this context, openpi's model code runs packed leaves (`openpi_interceptor`).

  Wrap the call that traces the model (`model.sample_actions(...)`, or the first call of a jitted
  one): the interceptor acts at trace time, and a compiled function keeps what it traced.
  `execution`: which kernels run the packed weights (`runtime.Execution`).
  """
  with nn.intercept_methods(functools.partial(openpi_interceptor, memo=InputMemo(),
                                              execution=execution)):
    yield


def _linen_prefixes(model: Any) -> list[tuple]:
  """Paths of the nnx-bridged linen modules (`nnx_bridge.ToNNX`) in an NNX model."""
  from flax import nnx
  from flax.nnx import bridge
  return [tuple(str(k) for k in path) for path, node in nnx.iter_graph(model)
          if isinstance(node, bridge.ToNNX)]


def _flat(tree: Any) -> dict[str, Any]:
  """{'/'-path: leaf} with each packed weight as one leaf."""
  return dict(flat_items(tree, is_leaf=is_packed))


def load_into_openpi(config_or_model: Any, params: Any, *, remove_extra_params: bool = True):
  """openpi's `BaseModelConfig.load(params)` for a tree with packed leaves.

  openpi's `load` builds the model abstractly (`nnx.eval_shape(config.create, key)`), checks the
  params' tree structure and shapes against the model's state, and merges them in
  (`replace_by_pure_dict`); a packed weight is a pytree of several arrays, so that check fails.
  Here each packed weight counts as one leaf of its float weight's shape (`.shape`), the rest is
  openpi's check, and the merged model holds the packed leaves as its params' values.

  Args:
    config_or_model: an openpi model config (anything with `create(rng)`, e.g. `Pi0Config`), or an
      NNX model whose params are replaced.
    params: the param tree (the dict holding 'PaliGemma', ...), float or packed leaves.
    remove_extra_params: as openpi: drop float leaves the model does not have (a packed one is
      always an error: it would be silently lost).

  Returns:
    The NNX model; run it under `run_packed_in_openpi()`.

  Raises:
    ValueError: a missing param, an extra packed param, a shape mismatch, or a packed weight
      outside the model's linen modules (e.g. an NNX `Linear` such as `action_in_proj`: keep
      it in floating point, as the presets do), each naming the param path.
  """
  from flax import nnx
  if isinstance(params, dict) and set(params) == {"params"}:
    raise ValueError("params must be the param tree holding 'PaliGemma'; pass variables['params']")
  model = config_or_model
  if not isinstance(model, nnx.Module):
    model = nnx.eval_shape(config_or_model.create, jax.random.key(0))
  graphdef, state = nnx.split(model)
  # flax >= 0.11 has nnx.to_pure_dict; openpi pins 0.10.2, which has only the State method.
  pure = nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()
  expected = _flat(pure)
  got = _flat(params)
  linen = ["/".join(p) + "/" for p in _linen_prefixes(model)]
  for path in sorted(set(got) - set(expected)):
    if is_packed(got[path]) or not remove_extra_params:
      raise ValueError(f"{path}: not a param of the openpi model ({type(model).__name__})")
    del got[path]
  missing = sorted(set(expected) - set(got))
  if missing:
    raise ValueError(f"{missing[0]}: missing from params ({len(missing)} missing in all)")
  for path, x in got.items():
    want, have = tuple(expected[path].shape), tuple(getattr(x, "shape", ()))
    if want != have:
      raise ValueError(f"{path}: shape {have} but the openpi model expects {want}")
    if is_packed(x) and not any(path.startswith(p) for p in linen):
      raise ValueError(f"{path}: a packed weight in an NNX module; only the linen modules under "
                       f"{[p.rstrip('/') for p in linen]} run packed weights, keep it float")
  nested: dict = {}
  for path, x in got.items():
    node = nested
    *parents, last = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = x
  if hasattr(nnx, "replace_by_pure_dict"):
    nnx.replace_by_pure_dict(state, nested)
  else:
    state.replace_by_pure_dict(nested)
  return nnx.merge(graphdef, state)
