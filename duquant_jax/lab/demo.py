"""The main job on the built-in demo model: calibrate, quantize, and compare with the FP policy."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from duquant_jax.attention_balance import balance_attention
from duquant_jax.calib_data import calibration_batches
from duquant_jax.calibrate import CalibConfig, calibrate, hessian_for, select_for
from duquant_jax.config import QuantConfig, match_rules
from duquant_jax.lab.synthetic import realistic_params
from duquant_jax.layouts import linear_layouts
from duquant_jax.models import Policy, get_policy
from duquant_jax.quantize import quantize_params, summarize
from duquant_jax.runtime import PackedRuntime


@dataclasses.dataclass(frozen=True)
class DemoResult:
  model: str
  preset: str
  layers_quantized: int
  weight_bytes_fp: int
  weight_bytes_packed: int
  calib_batches: int
  calib_seconds: float
  pack_seconds: float
  action_rel_err_mean: float
  action_rel_err_max: float
  latency_fp_ms: float
  latency_packed_ms: float
  rule_report: str


def action_rel_err(a_q, a_fp) -> np.ndarray:
  """||a_q - a_fp|| / ||a_fp|| per sample: (B, A, D) x 2 -> (B,)."""
  a_q = np.asarray(a_q, np.float64).reshape(len(a_q), -1)
  a_fp = np.asarray(a_fp, np.float64).reshape(len(a_fp), -1)
  return np.linalg.norm(a_q - a_fp, axis=-1) / np.maximum(np.linalg.norm(a_fp, axis=-1), 1e-12)


def median_latency_ms(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def run_demo(model: str, cfg: QuantConfig, *, calib_batches: int | None = None, batch_size: int = 2,
             eval_batch: int = 8, seed: int = 0, progress: bool = True) -> DemoResult:
  """Quantizes the demo model with `cfg` and measures it against the FP policy.

  Calibration uses `calib_batches` (default: the config's) batches of `batch_size` observations
  from toy-environment rollouts; the evaluation uses `eval_batch` held-out observations from
  rollouts with another seed, the same noise for both policies. A config with
  `attention_balance` is balanced on the calibration batches after packing (in the pack time).
  """
  policy: Policy = get_policy(model, "demo", runtime=PackedRuntime())
  params = realistic_params(policy, seed)
  n_calib = calib_batches or cfg.calib_batches
  t0 = time.perf_counter()
  stats = None
  if cfg.rules:
    batches = calibration_batches(policy, params, jax.random.key(seed + 1), num_batches=n_calib,
                                  batch_size=batch_size)
    stats = calibrate(policy, params, batches,
                      CalibConfig(select=select_for(cfg, params), progress=progress,
                                  hessian=hessian_for(cfg, params)),
                      rng=jax.random.key(seed + 2))
    jax.block_until_ready(stats)
  calib_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  packed = quantize_params(params, cfg, stats, progress=progress)
  if cfg.attention_balance is not None and cfg.rules:
    packed, _ = balance_attention(policy, params, packed, batches, cfg,
                                  rng=jax.random.key(seed + 2))
  jax.block_until_ready(packed)
  pack_s = time.perf_counter() - t0
  held = calibration_batches(policy, params, jax.random.key(seed + 1000), num_batches=1,
                             batch_size=eval_batch)
  obs = jax.tree.map(lambda x: x[0], held)
  sample = jax.jit(policy.sample_actions)
  rng = jax.random.key(seed + 3)
  a_fp = sample(params, obs, rng)
  a_q = sample(packed, obs, rng)
  err = action_rel_err(a_q, a_fp)
  summary = summarize(packed)
  report = match_rules(cfg, linear_layouts(params)).summary()
  return DemoResult(
      model=model, preset=cfg.name, layers_quantized=summary.layers_quantized,
      weight_bytes_fp=summary.weight_bytes_fp, weight_bytes_packed=summary.weight_bytes_packed,
      calib_batches=n_calib if cfg.rules else 0, calib_seconds=calib_s, pack_seconds=pack_s,
      action_rel_err_mean=float(err.mean()), action_rel_err_max=float(err.max()),
      latency_fp_ms=median_latency_ms(sample, params, obs, rng),
      latency_packed_ms=median_latency_ms(sample, packed, obs, rng), rule_report=report)


def format_result(r: DemoResult) -> str:
  ratio = r.weight_bytes_packed / r.weight_bytes_fp if r.weight_bytes_fp else float("nan")
  rows = [
      ("model / preset", f"{r.model} demo / {r.preset}"),
      ("layers quantized", f"{r.layers_quantized}"),
      ("weight bytes (quantized layers)", f"bf16 {r.weight_bytes_fp:,} -> packed "
                                          f"{r.weight_bytes_packed:,} ({ratio:.3f}x)"),
      ("calibration", f"{r.calib_batches} batches, {r.calib_seconds:.1f} s"),
      ("pack time", f"{r.pack_seconds:.1f} s"),
      ("action rel. error vs FP", f"mean {r.action_rel_err_mean:.4f}, worst {r.action_rel_err_max:.4f}"),
      ("latency sample_actions", f"FP {r.latency_fp_ms:.1f} ms, packed {r.latency_packed_ms:.1f} ms "
                                 f"(this backend: {jax.default_backend()})"),
  ]
  w = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
