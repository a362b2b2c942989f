"""Calibration of any flax (linen) model: capture linear inputs by interception, in a `lax.scan`.

DuQuant (Lin et al., NeurIPS 2024) builds its smoothing, rotations and permutation from the
activations x of each linear y = x W. `calibrate_apply` runs the user's own apply function over a
stack of batches inside one jitted `jax.lax.scan`; flax's `nn.intercept_methods` sees every
`Dense` / `DenseGeneral` / `Einsum` call, and for the kernels a config quantizes it folds the call's
input rows into streaming statistics (`duquant_jax.stats`: per-channel max, histograms and a
uniform reservoir of rows). The result is what `quantize_params(params, cfg, stats)` takes.

Axes: NB batches (the scan axis), M rows of one call (every axis of x but the contracted ones),
K the contracted width, R reservoir rows.

Follows `duquant_jax.calibrate` (the pi0 policy's calibration), with the model's linears found by
interception instead of openpi's declared sites.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from duquant_jax.config import QuantConfig
from duquant_jax.models.gemma import LINEAR_MODULES, dense_contraction
from duquant_jax.stats import ChannelStats, HistSpec, accumulate, init_channel_stats, squeeze_layers


def _kernel_path(module: nn.Module) -> str:
  """The '/'-joined param path of a module's kernel: `kernel` for the root module."""
  return "/".join((*module.path, "kernel"))


def _capture(apply_fn: Callable, params: Any, batch: Any, cfg: QuantConfig,
             sites: dict[str, str]) -> dict[str, jax.Array]:
  """Runs apply_fn(params, batch) and returns {site: rows (M, K) float32} of the selected kernels.

  `sites` (filled here, path -> site) records which kernel paths were seen: members of one
  shared-input group (`QuantConfig.input_group`) share the site of the first one called.
  """
  rows: dict[str, list[jax.Array]] = {}
  inputs: dict[str, Any] = {}  # site -> the array its group was last called with

  def hook(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, LINEAR_MODULES):
      return next_fun(*args, **kwargs)
    path = _kernel_path(module)
    if cfg.rule_for(path) is None:
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    n_contract, _ = dense_contraction(module, x, args, kwargs)
    x2 = jnp.asarray(x, jnp.float32).reshape(-1, math.prod(x.shape[x.ndim - n_contract:]))
    group = cfg.input_group(path)
    site = sites.setdefault(path, next((s for p, s in sites.items() if group is not None
                                        and cfg.input_group(p) == group), path))
    if site == path:  # one group member's rows stand for all of them
      rows.setdefault(site, []).append(x2)
      inputs[site] = x
    elif inputs.get(site) is not x:
      raise ValueError(f"{path} and {site} are declared to share an input ({group!r}) but read "
                       "different arrays (cross-attention?); narrow QuantConfig.shared_inputs")
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(hook):
    apply_fn(params, batch)
  return {s: jnp.concatenate(v, axis=0) for s, v in rows.items()}


def calibrate_apply(apply_fn: Callable[[Any, Any], Any], params: Any, batches: Any,
                    cfg: QuantConfig, *, num_samples: int = 128,
                    rng: Optional[jax.Array] = None,
                    spec: HistSpec = HistSpec()) -> dict[str, ChannelStats]:
  """Calibration statistics of any flax linen model, for `quantize_params(params, cfg, stats)`.

  Args:
    apply_fn: `apply_fn(params, batch)` runs the model, e.g.
      `lambda p, b: model.apply({"params": p}, b)`; its output is ignored. It is traced once.
    params: the float param tree `quantize_params` will pack.
    batches: a pytree whose leaves have a leading batch-stack axis NB (one `lax.scan` step per
      batch), or a list of batches (stacked here).
    cfg: the config to be packed: only kernels it quantizes are captured.
    num_samples: R, activation rows kept per linear (a uniform sample of all rows; the greedy
      rotation and the clip search read them).
    rng: key of the reservoir's sampling (default `jax.random.key(0)`).
    spec: histogram bins of |x| (`duquant_jax.stats.HistSpec`).

  Returns:
    {kernel path: ChannelStats} (unstacked: absmax (K,), samples (R, K), ...); every member of a
    shared-input group maps to the same stats.

  Raises:
    ValueError: no quantized linear was called by apply_fn.
    NotImplementedError: a selected DenseGeneral / Einsum whose contraction a packed kernel cannot
      run (`models.gemma.dense_contraction`).

  Example:
    stats = calibrate_apply(lambda p, b: model.apply({"params": p}, b), params, batches, cfg)
    packed = quantize_params(params, cfg, stats)
  """
  if isinstance(batches, (list, tuple)):
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  rng = jax.random.key(0) if rng is None else rng
  sites: dict[str, str] = {}
  first = jax.tree.map(lambda a: a[0], batches)
  shapes = jax.eval_shape(lambda p, b: _capture(apply_fn, p, b, cfg, sites), params, first)
  if not shapes:
    raise ValueError(f"apply_fn called no linear that config {cfg.name!r} quantizes (captured: "
                     "flax Dense / DenseGeneral / Einsum calls whose kernel path matches a rule)")

  def init(s):
    return init_channel_stats(num_layers=1, num_channels=s.shape[-1], num_samples=num_samples,
                              spec=spec)

  @jax.jit
  def run(params, batches, rng):
    def step(carry, batch):
      stats, key = carry
      key, sub = jax.random.split(key)
      rows = _capture(apply_fn, params, batch, cfg, {})
      out = {}
      for i, (site, st) in enumerate(sorted(stats.items())):
        x = rows[site]
        priority = jax.random.uniform(jax.random.fold_in(sub, i), (x.shape[0],))
        out[site] = accumulate(st, x[None], jnp.ones((x.shape[0],), bool), priority)
      return (out, key), None

    (stats, _), _ = jax.lax.scan(step, ({s: init(v) for s, v in shapes.items()}, rng), batches)
    return stats

  stats = {site: squeeze_layers(st) for site, st in run(params, batches, rng).items()}
  return {path: stats[site] for path, site in sites.items()}
