"""Flax NNX models: their params as a path-keyed tree, calibration, and the packed run.

An `nnx.Module` holds its weights in `nnx.Param` variables reached by attribute names and list
indices (`layers/0/attn/query/kernel`). `nnx_params` lists them as the nested dict of string keys
that `quantize_params` and the rules read (`QuantConfig`: `re.fullmatch` on the '/'-joined path),
and `quantized_nnx_apply` puts such a tree back. Calibration and the packed run leave the user's
module as it is: each runs on a copy made inside the traced function (`nnx.split` outside,
`nnx.merge` inside), where `nnx.recursive_map` puts a router in place of every selected layer:
  - `calibrate_nnx`: a tap that shows the layer's input to a `capture.Recorder`, then runs the
    layer; the scan driver is linen's (`capture.calibrate_runner`), so the statistics are the
    ones `calibrate_apply` captures from the same layers;
  - `quantized_nnx_apply`: where a layer's kernel Param holds a `PackedLinear`, the router
    flattens x's contracted axes, runs the packed matmul (linears of one shared-input group that
    read the same x quantize it once per call), restores the feature axes and adds the bias.
Layers routed: `nnx.Linear`, `nnx.LinearGeneral` (x's trailing axes contracted, no batch axes),
`nnx.Einsum` (`...I,IO->...O`), and subclasses that keep their `__call__`. Another module whose
2-D `kernel` a rule selects is refused: it would be packed but could not run.

Axes: M rows of one call (every axis of x but the contracted ones), K the contracted width, N the
flattened output features.

Follows `duquant_jax.capture` and `duquant_jax.runtime` (their linen counterparts, by
`nn.intercept_methods`); DuQuant: Lin et al., NeurIPS 2024.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from duquant_jax.capture import Recorder, calibrate_runner
from duquant_jax.config import QuantConfig
from duquant_jax.layouts import linear_layouts
from duquant_jax.models.flax_linear import einsum_contraction, trailing_axes
from duquant_jax.packed import PackedLinear
from duquant_jax.runtime import AUTO, Execution, shared_matmul
from duquant_jax.stats import ChannelStats, HistSpec
from duquant_jax.treepath import flat_items

# NNX layers whose kernel a packed one may replace (their own `__call__` is the float reference).
LINEAR_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
# A method name of the model, or `f(model, *args, **kwargs)`.
Method = Union[str, Callable[..., Any]]


def _join(parts: tuple, leaf: Optional[str] = None) -> str:
  return "/".join(str(p) for p in (*parts, *(() if leaf is None else (leaf,))))


def nnx_params(model: nnx.Module | nnx.State) -> dict[str, Any]:
  """The `nnx.Param` values of an NNX module (or of its State) as the tree `quantize_params` packs.

  Args:
    model: an `nnx.Module`, or an `nnx.State` of one (non-Param variables are left out).

  Returns:
    Nested dicts with string keys (list indices as '0', '1', ...) and the Params' arrays as leaves,
    so the '/'-joined paths are the State's paths: `{"layers": {"0": {"kernel": (K, N)}}}` is
    `layers/0/kernel`.

  Raises:
    TypeError: neither a Module nor a State.
  """
  if isinstance(model, nnx.Module):
    state = nnx.state(model, nnx.Param)
  elif isinstance(model, nnx.State):
    state = model
  else:
    raise TypeError(f"nnx_params takes an nnx.Module or nnx.State, got {type(model).__name__}")
  out: dict[str, Any] = {}
  for parts, var in nnx.to_flat_state(state):
    if isinstance(var, nnx.Param):
      node = out
      for k in parts[:-1]:
        node = node.setdefault(str(k), {})
      node[str(parts[-1])] = var.get_value()
  return out


# ----------------------------------------------------------------------------------------------
# Layers and their calls.


def _layer_kind(node: Any) -> Optional[type]:
  """The NNX layer (of `LINEAR_LAYERS`) whose forward `node` runs, or None."""
  for base in LINEAR_LAYERS:
    if isinstance(node, base) and type(node).__call__ is base.__call__:
      return base
  return None


def _declared_kernel_shape(layer: nnx.Module) -> tuple[int, ...]:
  """One layer's kernel shape as the layer's own fields declare it."""
  if isinstance(layer, nnx.Linear):
    return (layer.in_features, layer.out_features)
  if isinstance(layer, nnx.LinearGeneral):
    return (*layer.batch_axis.values(), *layer.in_features, *layer.out_features)
  return tuple(layer.kernel_shape)


def _check_unstacked(layer: nnx.Module, shape: tuple[int, ...], path: str) -> None:
  """Raises NotImplementedError where the kernel carries axes its layer does not declare (layers
  stacked by `nnx.vmap` and run in `nnx.scan`)."""
  if tuple(shape) != _declared_kernel_shape(layer):
    raise NotImplementedError(f"{path}: kernel of shape {tuple(shape)} but the "
                              f"{type(layer).__name__} declares {_declared_kernel_shape(layer)}; "
                              "stacked (vmapped / scanned) NNX layers are not supported")


def _call_args(kind: type, layer: nnx.Module, inputs, args, kwargs) -> tuple[Optional[str], Any]:
  """(the einsum equation of an Einsum call, else None; the call's out_sharding)."""
  bound = inspect.signature(kind.__call__).bind(layer, inputs, *args, **kwargs).arguments
  eqn = (bound.get("einsum_str") or layer.einsum_str) if kind is nnx.Einsum else None
  return eqn, bound.get("out_sharding")


def _contraction(layer: nnx.Module, x: jax.Array, eqn: Optional[str],
                 path: str) -> tuple[int, tuple[int, ...]]:
  """(how many trailing axes of x the kernel contracts, the output feature shape) of a call.

  Raises:
    NotImplementedError: a LinearGeneral contracting non-trailing axes (or with batch axes); an
      Einsum not of the form `...I,IO->...O`.
  """
  if isinstance(layer, nnx.Linear):
    return 1, (layer.out_features,)
  if isinstance(layer, nnx.LinearGeneral):
    if layer.batch_axis or not trailing_axes(layer.axis, x.ndim):
      raise NotImplementedError(f"{path}: a packed LinearGeneral needs trailing "
                                f"contraction axes and no batch_axis ({layer.axis=})")
    return len(layer.axis), tuple(layer.out_features)
  return einsum_contraction(eqn, tuple(layer.kernel_shape), path)


class _Router(nnx.Module, pytree=False):
  """Stands in a copy of the model where a selected layer was; attribute reads go to the layer."""

  def __init__(self, layer: nnx.Module, kind: type, path: str):
    self.layer = layer
    self.kind = kind
    self.path = path  # the kernel's path

  def __getattr__(self, name: str):
    if name.startswith("_") or name in ("layer", "kind", "path"):
      raise AttributeError(name)
    return getattr(self.layer, name)


class _Tap(_Router):
  """Shows the layer's input to the recorder, then runs the layer as it is."""

  def __init__(self, layer: nnx.Module, kind: type, path: str, recorder: Recorder):
    super().__init__(layer, kind, path)
    self.recorder = recorder

  def __call__(self, inputs, *args, **kwargs):
    eqn, _ = _call_args(self.kind, self.layer, inputs, args, kwargs)
    n_contract, _ = _contraction(self.layer, inputs, eqn, self.path)
    self.recorder.record(self.path, inputs, n_contract)
    return self.layer(inputs, *args, **kwargs)


class _Packed(_Router):
  """Runs the layer with the PackedLinear its kernel Param holds."""

  def __init__(self, layer: nnx.Module, kind: type, path: str, memo: dict, execution: Execution):
    super().__init__(layer, kind, path)
    self.memo, self.execution = memo, execution

  def __call__(self, inputs, *args, **kwargs):
    layer = self.layer
    eqn, sharding = _call_args(self.kind, layer, inputs, args, kwargs)
    if sharding is not None:
      raise NotImplementedError(f"{self.path}: out_sharding is not supported by packed layers")
    w: PackedLinear = layer.kernel.get_value()
    x = inputs if layer.dtype is None else jnp.asarray(inputs, layer.dtype)
    n_contract, features = _contraction(layer, x, eqn, self.path)
    lead, k = x.shape[:x.ndim - n_contract], math.prod(x.shape[x.ndim - n_contract:])
    if k != w.in_features:
      raise ValueError(f"{self.path}: x of shape {x.shape} contracts K={k}, the packed kernel "
                       f"K={w.in_features}")
    y = shared_matmul(w, x.reshape(-1, k), self.memo, x, self.execution)
    y = y.reshape(*lead, *features)
    if layer.bias is not None:
      y = y + jnp.asarray(layer.bias.get_value()).reshape(features).astype(y.dtype)
    return y


def _caller(method: Method) -> Callable[..., Any]:
  if callable(method):
    return method
  return lambda model, *args, **kwargs: getattr(model, method)(*args, **kwargs)


def _kernel_of(node: Any) -> Optional[nnx.Variable]:
  kernel = getattr(node, "kernel", None) if isinstance(node, nnx.Module) else None
  return kernel if isinstance(kernel, nnx.Variable) else None


# ----------------------------------------------------------------------------------------------
# Calibration.


def _check_selected_layers(model: nnx.Module, cfg: QuantConfig) -> None:
  """Refuses modules that are not routed layers but hold a kernel that `quantize_params` would
  pack under `cfg` (it could not run)."""
  declared = linear_layouts(nnx_params(model))
  for parts, node in nnx.iter_modules(model):
    path = _join(parts, "kernel")
    if _kernel_of(node) is not None and _layer_kind(node) is None and path in declared and (
        cfg.rule_for(path) is not None):
      raise ValueError(f"{path}: config {cfg.name!r} selects the kernel of an nnx "
                       f"{type(node).__name__}, which cannot run packed (only nnx.Linear / "
                       "LinearGeneral / Einsum with their own __call__); keep it float with a skip "
                       "rule, e.g. generic_config(skip=...)")


def calibrate_nnx(model: nnx.Module, batches: Any, cfg: QuantConfig, *,
                  method: Method = "__call__", num_samples: int = 128,
                  rng: Optional[jax.Array] = None,
                  spec: HistSpec = HistSpec()) -> dict[str, ChannelStats]:
  """Calibration statistics of a Flax NNX model, for `quantize_params(nnx_params(model), cfg,
  stats)`.

  The model is split once; every scan step merges a copy, routes the selected layers' calls
  through a tap and runs it, so the model itself is never changed (state updates of the calls,
  such as RNG counts, are discarded: put the model in evaluation mode first).

  Args:
    model: the float `nnx.Module`.
    batches: a pytree whose leaves have a leading batch-stack axis NB (one `lax.scan` step per
      batch), or a list of batches (stacked here).
    cfg: the config to be packed: only kernels it quantizes are captured.
    method: what a step runs: the name of a method of the model, called with the batch
      (default `model(batch)`), or `f(model, batch)`.
    num_samples: R, activation rows kept per linear.
    rng: key of the reservoir's sampling (default `jax.random.key(0)`).
    spec: histogram bins of |x| (`duquant_jax.stats.HistSpec`).

  Returns:
    {kernel path: ChannelStats}, paths as `nnx_params` has them; every member of a shared-input
    group maps to the same stats. The same statistics as `calibrate_apply` on a linen model with
    the same layers, weights and batches.

  Raises:
    ValueError: no selected layer was called; a selected 2-D kernel in a module that cannot run
      packed; declared shared inputs read different arrays.
    NotImplementedError: a selected LinearGeneral / Einsum whose contraction a packed kernel
      cannot run; stacked (vmapped) layers.

  Example:
    stats = calibrate_nnx(model, batches, cfg)
    packed = quantize_params(nnx_params(model), cfg, stats)
  """
  _check_selected_layers(model, cfg)
  graphdef, state = nnx.split(model)
  call = _caller(method)

  def run(state, batch, recorder: Recorder):
    def route(parts, node):
      kind = _layer_kind(node)
      path = _join(parts, "kernel")
      if kind is None or not recorder.wants(path):
        return node
      _check_unstacked(node, node.kernel.shape, path)
      return _Tap(node, kind, path, recorder)

    call(nnx.recursive_map(route, nnx.merge(graphdef, state)), batch)

  return calibrate_runner(run, state, batches, cfg, num_samples=num_samples, rng=rng, spec=spec,
                          seen="captured: nnx Linear / LinearGeneral / Einsum calls")


# ----------------------------------------------------------------------------------------------
# The packed run.


def _with_params(state: nnx.State, params: Mapping) -> nnx.State:
  """The Param state with every value taken from `params` (same paths, same shapes)."""
  given = dict(flat_items(params, is_leaf=lambda v: not isinstance(v, Mapping)))
  out, seen = [], set()
  for parts, var in nnx.to_flat_state(state):
    path = _join(parts)
    seen.add(path)
    if path not in given:
      raise ValueError(f"{path}: missing from params (pass nnx_params(model), or the tree "
                       "quantize_params made of it)")
    value = given[path]
    shape = tuple(getattr(value, "shape", ()))
    if shape != tuple(var.shape):
      raise ValueError(f"{path}: shape {shape} in params, {tuple(var.shape)} in the model")
    out.append((parts, var.replace(value)))
  extra = sorted(set(given) - seen)
  if extra:
    raise ValueError(f"params hold {len(extra)} paths that are no Param of the model: "
                     f"{', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}")
  return nnx.from_flat_state(out)


def quantized_nnx_apply(model: nnx.Module, params: Mapping, *args, method: Method = "__call__",
                        execution: Execution = AUTO, **kwargs):
  """Runs an NNX model with a param tree whose kernels may be packed (`PackedLinear`).

  A copy of the model gets `params` in its Params (`nnx_params` paths: the tree `quantize_params`
  returns); every Linear / LinearGeneral / Einsum whose kernel is packed runs the quantized
  matmul, everything else runs as it is. The model itself is not changed, and state updates of
  the call are discarded. Traceable: jit it as a function of params and inputs, e.g.
  `jax.jit(lambda p, x: quantized_nnx_apply(model, p, x))`.

  Args:
    model: the float `nnx.Module` the params came from.
    params: the packed (or any float) tree with the model's Param paths and shapes.
    *args, **kwargs: the call's inputs.
    method: the name of the model's method to call (default `__call__`), or
      `f(model, *args, **kwargs)`.
    execution: which kernels run the packed layers (`runtime.Execution`).

  Returns:
    What the method returns.

  Raises:
    ValueError: params missing a Param of the model, holding paths the model lacks, or of other
      shapes; a packed kernel in a module that is not a routed layer.
    NotImplementedError: a LinearGeneral / Einsum call a packed kernel cannot run; a stacked packed
      kernel; out_sharding on a packed layer.

  Example:
    packed = quantize_params(nnx_params(model), cfg, calibrate_nnx(model, batches, cfg))
    y = jax.jit(lambda p, x: quantized_nnx_apply(model, p, x))(packed, x)
  """
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  copy = nnx.merge(graphdef, _with_params(state, params), rest)
  memo: dict = {}

  def route(parts, node):
    kernel = _kernel_of(node)
    if kernel is None or not isinstance(kernel.get_value(), PackedLinear):
      return node
    path = _join(parts, "kernel")
    kind = _layer_kind(node)
    if kind is None:
      raise ValueError(f"{path}: packed, but an nnx {type(node).__name__} cannot run a packed "
                       "kernel (only nnx.Linear / LinearGeneral / Einsum with their own __call__)")
    _check_unstacked(node, kernel.get_value().shape, path)
    return _Packed(node, kind, path, memo, execution)

  return _caller(method)(nnx.recursive_map(route, copy), *args, **kwargs)
