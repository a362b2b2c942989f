"""Calibration of any flax model: capture linear inputs by interception, in a `lax.scan`.

DuQuant (Lin et al., NeurIPS 2024) builds its smoothing, rotations and permutation from the
activations x of each linear y = x W. `calibrate_apply` runs the user's own apply function over a
stack of batches inside one jitted `jax.lax.scan`; flax's `nn.intercept_methods` sees every
`Dense` / `DenseGeneral` / `Einsum` call, and for the kernels a config quantizes it folds the call's
input rows into streaming statistics (`duquant_jax.stats`: per-channel max, histograms and a
uniform reservoir of rows). The result is what `quantize_params(params, cfg, stats)` takes.
The scan driver (`calibrate_runner`) takes any runner that shows a model's linear calls to a
`Recorder`; `duquant_jax.nnx_models.calibrate_nnx` runs Flax NNX models through it.

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
from duquant_jax.models.flax_linear import LINEAR_MODULES, dense_contraction
from duquant_jax.gptq import hessian_block_for
from duquant_jax.stats import ChannelStats, HistSpec, accumulate, init_channel_stats, squeeze_layers


def _kernel_path(module: nn.Module) -> str:
  """The '/'-joined param path of a module's kernel: `kernel` for the root module."""
  return "/".join((*module.path, "kernel"))


class Recorder:
  """The input rows of the selected linears during one traced call of a model.

  A model runner (linen interception here, NNX routing in `duquant_jax.nnx_models`) asks `wants`
  for each linear call's kernel path and hands the selected calls' inputs to `record`. `sites`
  (filled here, path -> site) records which kernel paths were seen: members of one shared-input
  group (`QuantConfig.input_group`) share the site of the first one called.
  """

  def __init__(self, cfg: QuantConfig, sites: dict[str, str]):
    self.cfg = cfg
    self.sites = sites
    self._rows: dict[str, list[jax.Array]] = {}
    self._inputs: dict[str, Any] = {}  # site -> the array its group was last called with

  def wants(self, path: str) -> bool:
    """Whether the config quantizes the kernel at `path` (so its inputs are captured)."""
    return self.cfg.rule_for(path) is not None

  def record(self, path: str, x: jax.Array, n_contract: int) -> None:
    """Records x (..., K...) of a call of the kernel at `path` contracting its `n_contract`
    trailing axes, as rows (M, K) float32.

    Raises:
      ValueError: members of a declared shared-input group called with different arrays.
    """
    x2 = jnp.asarray(x, jnp.float32).reshape(-1, math.prod(x.shape[x.ndim - n_contract:]))
    cfg, sites = self.cfg, self.sites
    group = cfg.input_group(path)
    site = sites.setdefault(path, next((s for p, s in sites.items() if group is not None
                                        and cfg.input_group(p) == group), path))
    if site == path:  # one group member's rows stand for all of them
      self._rows.setdefault(site, []).append(x2)
      self._inputs[site] = x
    elif self._inputs.get(site) is not x:
      raise ValueError(f"{path} and {site} are declared to share an input ({group!r}) but read "
                       "different arrays (cross-attention?); narrow QuantConfig.shared_inputs")

  def rows(self) -> dict[str, jax.Array]:
    """{site: rows (M, K) float32} of every call recorded."""
    return {s: jnp.concatenate(v, axis=0) for s, v in self._rows.items()}


# run(params, batch, recorder): runs the model on one batch, showing selected linear calls to
# the recorder.
Runner = Callable[[Any, Any, Recorder], Any]


def _linen_runner(apply_fn: Callable[[Any, Any], Any]) -> Runner:
  """Runs a linen apply function with flax `Dense` / `DenseGeneral` / `Einsum` calls intercepted."""

  def run(params, batch, recorder: Recorder):
    def hook(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name == "__call__" and isinstance(module, LINEAR_MODULES):
        path = _kernel_path(module)
        if recorder.wants(path):
          x = args[0] if args else kwargs["inputs"]
          n_contract, _ = dense_contraction(module, x, args, kwargs)
          recorder.record(path, x, n_contract)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(hook):
      apply_fn(params, batch)

  return run


def _capture(run: Runner, params: Any, batch: Any, cfg: QuantConfig,
             sites: dict[str, str]) -> dict[str, jax.Array]:
  """Runs the model on one batch: {site: rows (M, K) float32} of the selected kernels."""
  recorder = Recorder(cfg, sites)
  run(params, batch, recorder)
  return recorder.rows()


HESSIAN_BLOCK = 2048


def calibrate_runner(run: Runner, params: Any, batches: Any, cfg: QuantConfig, *,
                     num_samples: int = 128, rng: Optional[jax.Array] = None,
                     spec: HistSpec = HistSpec(),
                     seen: str = "captured calls") -> dict[str, ChannelStats]:
  """The scan driver of `calibrate_apply` for any model runner (see `Runner`).

  `params` is what `run` takes (a param tree, or an NNX state), passed through `jax.jit`; `seen`
  names what the runner shows, for the error when nothing was captured. Returns and raises as
  `calibrate_apply`.
  """
  if isinstance(batches, (list, tuple)):
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  rng = jax.random.key(0) if rng is None else rng
  sites: dict[str, str] = {}
  first = jax.tree.map(lambda a: a[0], batches)
  shapes = jax.eval_shape(lambda p, b: _capture(run, p, b, cfg, sites), params, first)
  if not shapes:
    raise ValueError(f"the model called no linear that config {cfg.name!r} quantizes ({seen} "
                     "whose kernel path matches a rule)")

  # GPTQ rules need each input's Hessian (X^T X), kept as diagonal blocks of at most
  # HESSIAN_BLOCK channels; kept for every captured input when any rule rounds with GPTQ.
  gptq = any(r.rounding == "gptq" for r in cfg.rules if not r.skip)

  def init(s):
    k = s.shape[-1]
    return init_channel_stats(num_layers=1, num_channels=k, num_samples=num_samples, spec=spec,
                              hessian_block=hessian_block_for(k, HESSIAN_BLOCK) if gptq else None)

  @jax.jit
  def scan(params, batches, rng):
    def step(carry, batch):
      stats, key = carry
      key, sub = jax.random.split(key)
      rows = _capture(run, params, batch, cfg, {})
      out = {}
      for i, (site, st) in enumerate(sorted(stats.items())):
        x = rows[site]
        priority = jax.random.uniform(jax.random.fold_in(sub, i), (x.shape[0],))
        out[site] = accumulate(st, x[None], jnp.ones((x.shape[0],), bool), priority)
      return (out, key), None

    (stats, _), _ = jax.lax.scan(step, ({s: init(v) for s, v in shapes.items()}, rng), batches)
    return stats

  stats = {site: squeeze_layers(st) for site, st in scan(params, batches, rng).items()}
  return {path: stats[site] for path, site in sites.items()}


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
    shared-input group maps to the same stats. Where a rule of cfg rounds with GPTQ, each input's
    Hessian X^T X too (float32 diagonal blocks of at most 2048 channels).

  Raises:
    ValueError: no quantized linear was called by apply_fn.
    NotImplementedError: a selected DenseGeneral / Einsum whose contraction a packed kernel cannot
      run (`models.gemma.dense_contraction`).

  Example:
    stats = calibrate_apply(lambda p, b: model.apply({"params": p}, b), params, batches, cfg)
    packed = quantize_params(params, cfg, stats)
  """
  return calibrate_runner(_linen_runner(apply_fn), params, batches, cfg, num_samples=num_samples,
                          rng=rng, spec=spec,
                          seen="captured: flax Dense / DenseGeneral / Einsum calls")
