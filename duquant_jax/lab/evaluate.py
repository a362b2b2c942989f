"""Evaluation harness: fidelity of quantized policies to the FP policy, short and long horizon.

We cannot run LIBERO with real pi0 / pi0.5 weights here, so every variant is measured against the FP
policy of the same (synthetic, outlier-realistic) model:

- action relative error ||a_q - a_fp|| / ||a_fp|| per sample on held-out observations (taken from
  FP rollouts with another rng than the calibration data): for the final chunk, and per flow step on
  the velocities of `sample_actions(..., return_trajectory=True)` (each policy follows its own
  trajectory x_t, so step s carries the error accumulated over steps < s);
- closed-loop drift: FP and quantized policies rolled out in `ToyEnv` from the same start states and
  noise (`models.rollout.rollout` with one rng); divergence after c chunks = mean over episodes of
  the L2 distance of the states, and the first chunk where it exceeds a stated tolerance;
- per-layer output error ||x W_q - x W|| / ||x W|| on the calibration samples of every quantized
  linear and stacked layer (W_q: the packed weight run by `PackedLinear.matmul`, int8 activations
  included; x divided by the smoothing that was folded into the preceding norm);
- packed bytes vs bf16, pack time and calibration time.

Variants are preset names with optional rule overrides (`parse_variant`), e.g.
`recommended+rot=weight_svd`, `recommended+alpha=none`, `recommended@c128`, and attention balancing
(`recommended+attn=both`), which runs `balance_attention` on the calibration batches after packing.

Axes: B batch (episodes), C chunks, S flow steps, A action horizon, D action dim, L stacked layers,
R sample rows, K in features, N out features.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.calib_data import calibration_batches
from duquant_jax.calibrate import CalibConfig, calibrate, hessian_for, select_for
from duquant_jax.attention_balance import balance_attention
from duquant_jax.config import AttentionBalance, QuantConfig, get_preset
from duquant_jax.lab.demo import action_rel_err
from duquant_jax.lab.plots import pyplot
from duquant_jax.lab.synthetic import realistic_params
from duquant_jax.layouts import linear_layouts, to_2d
from duquant_jax.models import Policy, get_policy
from duquant_jax.models.rollout import ToyEnv, rollout
from duquant_jax.packed import PackedLinear
from duquant_jax import runtime
from duquant_jax.openpi_paths import GEMMA_LAYERS
from duquant_jax.quantize import (adarms_dense_folded, folded_smoothing, packed_items,
                                  producer_smoothing, quantize_params, rotated_model, summarize)
from duquant_jax.treepath import get_path

HORIZONS = (1, 5, 10, 25, 50)

# ------------------------------------------------------------------------------------------------
# Variants: "<preset>[+key=value]...[@c<N>]".

_OVERRIDES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "rot": ("rotation", str),
    "perm": ("permutation", str),
    "alpha": ("smooth_alpha", lambda v: None if v.lower() in ("none", "off") else float(v)),
    "block": ("block_size", int),
    "steps": ("rotation_steps", int),
    "gran": ("weight_granularity", str),
    "group": ("group_size", int),
    "outrot": ("output_rotation", str),
    "clip": ("clip_search", lambda v: {"on": True, "off": False}[v.lower()]),
    "wbits": ("weight_bits", int),
    "abits": ("act_bits", lambda v: None if v.lower() in ("none", "off", "16") else int(v)),
    "wsym": ("weight_symmetric", lambda v: {"on": True, "off": False}[v.lower()]),
    "asym": ("act_symmetric", lambda v: {"on": True, "off": False}[v.lower()]),
    "round": ("rounding", lambda v: {"nearest": "nearest", "gptq": "gptq"}[v.lower()]),
    "actorder": ("gptq_act_order", lambda v: {"on": True, "off": False}[v.lower()]),
}
# Overrides of the whole config: attention balancing (`duquant_jax.attention_balance`).
_ATTN_LEVERS = {"temp": dict(temperature=True, output=False),
                "out": dict(temperature=False, output=True),
                "both": dict(temperature=True, output=True)}
_CONFIG_OVERRIDES = {
    "attn": "attention balance levers: temp, out, both or off",
    "attnfit": "attention balance fit: energy or least_squares",
    "attnllm": "attention balance of the LLM too: on or off",
}
VARIANT_SYNTAX = ("<preset>[+key=value]...[@c<N>]; keys: " + ", ".join(
    f"{k} ({f})" for k, (f, _) in _OVERRIDES.items()) + ", " + ", ".join(
    f"{k} ({d})" for k, d in _CONFIG_OVERRIDES.items()) + "; @cN: calibrate on N batches")


@dataclasses.dataclass(frozen=True)
class Variant:
  """A named configuration to evaluate: a preset with rule overrides and a calibration size."""

  name: str
  cfg: QuantConfig
  calib_batches: Optional[int]  # None: the harness default


def parse_variant(spec: str) -> Variant:
  """Parses `recommended+rot=weight_svd+alpha=none@c32` (overrides apply to every quantizing rule).

  Raises:
    ValueError: unknown preset, key or value (the message names the spec and the allowed keys).
  """
  spec = spec.strip()
  base, calib = spec, None
  if "@" in spec:
    base, tail = spec.rsplit("@", 1)
    if not (tail.startswith("c") and tail[1:].isdigit() and int(tail[1:]) > 0):
      raise ValueError(f"variant {spec!r}: expected '@c<N>' (N calibration batches), got '@{tail}'")
    calib = int(tail[1:])
  preset, *mods = base.split("+")
  cfg = get_preset(preset)
  changes: dict[str, Any] = {}
  attn: dict[str, str] = {}
  for mod in mods:
    key, eq, value = mod.partition("=")
    if eq and key in _CONFIG_OVERRIDES:
      attn[key] = value.lower()
      continue
    if not eq or key not in _OVERRIDES:
      raise ValueError(f"variant {spec!r}: bad override {mod!r}; syntax {VARIANT_SYNTAX}")
    field, conv = _OVERRIDES[key]
    try:
      changes[field] = conv(value)
    except (ValueError, KeyError):
      raise ValueError(f"variant {spec!r}: bad value {value!r} for {key}") from None
  if changes:
    if not cfg.rules:
      raise ValueError(f"variant {spec!r}: preset {preset!r} has no rules to override")
    rules = tuple(r if r.skip else dataclasses.replace(r, **changes) for r in cfg.rules)
    cfg = dataclasses.replace(cfg, rules=rules, name=base)
  if attn:
    cfg = dataclasses.replace(cfg, attention_balance=_attention_balance(spec, cfg, attn), name=base)
  return Variant(name=spec, cfg=cfg, calib_batches=calib)


def _attention_balance(spec: str, cfg: QuantConfig,
                       attn: dict[str, str]) -> Optional[AttentionBalance]:
  """The AttentionBalance of a variant's `attn*` overrides (on top of the preset's own)."""
  base = cfg.attention_balance
  levers = attn.get("attn")
  if levers == "off":
    if len(attn) > 1:
      raise ValueError(f"variant {spec!r}: attn=off with other attn* overrides")
    return None
  if levers is not None and levers not in _ATTN_LEVERS:
    raise ValueError(f"variant {spec!r}: bad value {levers!r} for attn; one of "
                     f"{', '.join(_ATTN_LEVERS)}, off")
  if levers is None and base is None:
    raise ValueError(f"variant {spec!r}: attnfit / attnllm need attn=temp|out|both (preset "
                     f"{cfg.name!r} balances no attention)")
  fields = dict(_ATTN_LEVERS[levers]) if levers else {}
  if "attnfit" in attn:
    if attn["attnfit"] not in ("energy", "least_squares"):
      raise ValueError(f"variant {spec!r}: bad value {attn['attnfit']!r} for attnfit")
    fields["fit"] = attn["attnfit"]
  if "attnllm" in attn:
    if attn["attnllm"] not in ("on", "off"):
      raise ValueError(f"variant {spec!r}: bad value {attn['attnllm']!r} for attnllm")
    fields["experts"] = (0, 1) if attn["attnllm"] == "on" else (1,)
  return dataclasses.replace(base or AttentionBalance(), **fields)


# ------------------------------------------------------------------------------------------------
# Metrics (numpy; pure functions with known answers, see tests/test_evaluate.py).


def error_summary(err: np.ndarray) -> tuple[float, float]:
  """(mean, 99th percentile) of a set of relative errors."""
  err = np.asarray(err, np.float64).ravel()
  return float(err.mean()), float(np.percentile(err, 99))


def flow_step_errors(v_q, v_fp) -> np.ndarray:
  """Per-step, per-sample relative velocity error: (S, B, A, D) x 2 -> (S, B)."""
  return np.stack([action_rel_err(q, f) for q, f in zip(np.asarray(v_q), np.asarray(v_fp))])


def state_divergence(states_q, states_fp) -> np.ndarray:
  """Mean over episodes of the L2 state distance: (C+1, B, D) x 2 -> (C+1,)."""
  d = np.asarray(states_q, np.float64) - np.asarray(states_fp, np.float64)
  return np.linalg.norm(d, axis=-1).mean(axis=-1)


def drift_at(divergence: np.ndarray, horizons: Sequence[int] = HORIZONS) -> dict[int, float]:
  """Divergence after h chunks for every h the rollout reached (h <= C)."""
  c = len(divergence) - 1
  return {int(h): float(divergence[h]) for h in horizons if h <= c}


def first_exceeding(divergence: np.ndarray, tolerance: float) -> Optional[int]:
  """The first chunk count c >= 1 whose divergence exceeds `tolerance`, or None."""
  over = np.nonzero(np.asarray(divergence)[1:] > tolerance)[0]
  return int(over[0]) + 1 if len(over) else None


@jax.jit
def _layer_err(p: PackedLinear, x, w2, lam):
  y_fp = jnp.matmul(x, w2, precision=jax.lax.Precision.HIGHEST)
  y_q = runtime.matmul(p, x / lam).astype(jnp.float32)
  return jnp.linalg.norm(y_q - y_fp) / jnp.maximum(jnp.linalg.norm(y_fp), 1e-30)


def layer_output_errors(params, packed, stats, *, max_rows: int = 64,
                        cfg: QuantConfig | None = None) -> dict[str, float]:
  """||x W_q - x W|| / ||x W|| for every quantized linear and stacked layer, on calibration samples.

  `cfg`: the config `packed` was made with; needed to read back what it folded beyond the norms
  (rotated residual streams, smoothing folded into producers). Without it only norm folds are
  undone.

  Returns:
    {"<weight path>[<layer>]": relative error}; linears without stats samples are skipped.
  """
  if cfg is not None:
    params, stats = rotated_model(params, cfg, stats)
  layers = getattr(stats, "layers", stats)
  layouts = linear_layouts(params)
  consumers = {lay.producer: lay for lay in layouts.values() if lay.producer is not None}
  adarms = {lay.adarms_dense for lay in layouts.values() if lay.adarms_dense}
  out = {}
  for path, p in packed_items(packed):
    if not isinstance(p, PackedLinear):
      continue
    st = layers.get(path) if stats is not None else None
    if st is None:
      continue
    lay = layouts[path]
    samples = np.asarray(st.samples)
    if hasattr(st, "sample_priority"):
      samples = samples[..., np.isfinite(np.asarray(st.sample_priority)), :]
    samples = samples[..., :max_rows, :]
    lam = folded_smoothing(params, packed, lay)
    if cfg is not None:
      lam_producer = producer_smoothing(params, packed, lay, cfg.rule_for(path), layers)
      lam = lam if lam_producer is None else lam_producer
    w = jnp.asarray(get_path(params, path))
    if path in adarms:  # an adaptive norm's Dense, packed from its norm's smoothing fold
      w = adarms_dense_folded(params, packed, path)
    if cfg is not None and path in consumers:  # the consumer's smoothing divides the up columns
      c = consumers[path]
      lam_c = producer_smoothing(params, packed, c, cfg.rule_for(c.path), layers)
      if lam_c is not None:
        w = w.astype(jnp.float32).at[..., 1, :, :].divide(lam_c[..., None, :])
    num = lay.stack_shape[0] if lay.num_stack else None
    for l in range(num or 1):
      sl = (lambda a: a[l]) if num else (lambda a: a)
      p_l = jax.tree.map(sl, p)
      x = jnp.asarray(sl(samples), jnp.float32)
      err = _layer_err(p_l, x, to_2d(sl(w), lay), sl(lam))
      out[f"{path}[{l}]" if num else path] = float(err)
  return out


# ------------------------------------------------------------------------------------------------
# The harness.


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """What the harness runs. Defaults keep the demo size to minutes on a 2-core CPU."""

  episodes: int = 4  # closed-loop episodes (one batch; task e % num_tasks)
  chunks: int = 10  # chunks per episode (drift horizons above this are not reported)
  num_steps: int = 10  # flow steps
  calib_batches: int = 16  # for variants without @cN; 0: each preset's own calib_batches
  batch_size: int = 2  # calibration batch size
  tolerance: float = 0.1  # state divergence (L2, state units) deemed "diverged"
  eval_times: int = 3  # chunk times of the FP rollout used as held-out observations
  layer_rows: int = 64  # calibration sample rows per layer for the per-layer error
  seed: int = 0

  def __post_init__(self):
    for f in ("episodes", "chunks", "num_steps", "batch_size", "eval_times", "layer_rows"):
      if getattr(self, f) < 1:
        raise ValueError(f"EvalConfig.{f} must be >= 1, got {getattr(self, f)}")
    if self.calib_batches < 0 or self.tolerance <= 0:
      raise ValueError("EvalConfig: calib_batches must be >= 0 and tolerance > 0")


@dataclasses.dataclass
class VariantResult:
  name: str
  calib_batches: int
  layers_quantized: int
  bytes_fp: int
  bytes_packed: int
  calib_s: float
  pack_s: float  # attention balancing included (`balance_s`)
  action_err_mean: float
  action_err_p99: float
  step_err_mean: list[float]
  step_err_p99: list[float]
  drift: dict[int, float]
  drift_curve: list[float]
  exceeds_at: Optional[int]
  layer_err_mean: float
  layer_err_worst: list[tuple[str, float]]
  balance_s: float = 0.0  # seconds of attention balancing (`QuantConfig.attention_balance`)


@dataclasses.dataclass
class EvalReport:
  model: str
  size: str
  config: dict
  results: list[VariantResult]

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)


def _held_out(obs, times: int):
  """Observations (C, B, ...) at `times` chunk times spread over the episode -> (times * B, ...)."""
  c = jax.tree.leaves(obs)[0].shape[0]
  idx = np.unique(np.round(np.linspace(0, c - 1, times)).astype(int))
  return jax.tree.map(lambda x: jnp.asarray(x)[idx].reshape((-1,) + x.shape[2:]), obs)


def evaluate(model: str, variants: Sequence[Variant], cfg: EvalConfig = EvalConfig(), *,
             size: str = "demo", params=None, log: Callable[[str], None] = lambda s: None,
             progress: bool = False) -> EvalReport:
  """Runs every variant against the FP policy (see the module docstring for the metrics).

  Args:
    model: 'pi0' or 'pi05'. size: model size ('demo' for runs on CPU).
    variants: from `parse_variant`.
    cfg: harness settings.
    params: FP params (default: `realistic_params(policy, cfg.seed)`).
    log: called with one line per finished stage.
    progress: tqdm bars during calibration.

  Returns:
    EvalReport with one VariantResult per variant (in order).
  """
  policy: Policy = get_policy(model, size, runtime=runtime.PackedRuntime())
  if params is None:
    params = realistic_params(policy, cfg.seed)
  env = ToyEnv(policy.cfg)
  tasks = jnp.arange(cfg.episodes) % env.num_tasks
  roll_key = jax.random.key(cfg.seed + 1000)  # held out: calibration uses seed + 1 / seed + 2
  obs_fp, states_fp, _ = rollout(policy, params, env, roll_key, tasks, cfg.chunks, cfg.num_steps)
  held = _held_out(obs_fp, cfg.eval_times)
  sample = jax.jit(policy.sample_actions, static_argnames=("num_steps", "return_trajectory"))
  act_key = jax.random.key(cfg.seed + 3)
  a_fp, v_fp = sample(params, held, act_key, cfg.num_steps, return_trajectory=True)
  log(f"FP rollout: {cfg.episodes} episodes x {cfg.chunks} chunks; "
      f"{held.batch_size} held-out observations")

  stats_cache: dict[tuple[int, str, Optional[str]], tuple[Any, Any, float]] = {}

  def stats_for(n: int, select: str, hessian: Optional[str]):
    # Keyed by the selection too: a variant quantizing SigLIP needs its linears captured as well,
    # one rounding with GPTQ their Hessians.
    key = (n, select, hessian)
    if key not in stats_cache:
      t = time.perf_counter()
      batches = calibration_batches(policy, params, jax.random.key(cfg.seed + 1), num_batches=n,
                                    batch_size=cfg.batch_size)
      st = calibrate(policy, params, batches,
                     CalibConfig(select=select, progress=progress, per_step=True, hessian=hessian),
                     rng=jax.random.key(cfg.seed + 2))
      jax.block_until_ready(st)
      stats_cache[key] = (st, batches, time.perf_counter() - t)
      log(f"calibrated on {n} batches of {cfg.batch_size} in {stats_cache[key][2]:.1f} s")
    return stats_cache[key]

  # One Hessian selection for all variants: the Hessians change no other statistic, so variants
  # with and without GPTQ share one calibration.
  hessian = "|".join(h for v in variants if (h := hessian_for(v.cfg, params))) or None
  results = []
  for v in variants:
    n = v.calib_batches or cfg.calib_batches or v.cfg.calib_batches
    stats, batches, calib_s = (stats_for(n, select_for(v.cfg, params), hessian) if v.cfg.rules
                               else (None, None, 0.0))
    t = time.perf_counter()
    packed = quantize_params(params, v.cfg, stats)
    jax.block_until_ready(packed)
    balance_s = 0.0
    if v.cfg.attention_balance is not None and batches is not None:
      t_b = time.perf_counter()
      packed, scalars = balance_attention(policy, params, packed, batches, v.cfg,
                                          rng=jax.random.key(cfg.seed + 2))
      jax.block_until_ready(packed)
      balance_s = time.perf_counter() - t_b
      log(f"{v.name}: attention balanced in {balance_s:.1f} s; scalars " + ", ".join(
          f"{p.rsplit('/', 2)[-2]} {float(jnp.min(s)):.3f}..{float(jnp.max(s)):.3f}"
          for p, s in scalars.items()))
    pack_s = time.perf_counter() - t
    a_q, v_q = sample(packed, held, act_key, cfg.num_steps, return_trajectory=True)
    act_mean, act_p99 = error_summary(action_rel_err(a_q, a_fp))
    step = flow_step_errors(v_q, v_fp)
    _, states_q, _ = rollout(policy, packed, env, roll_key, tasks, cfg.chunks, cfg.num_steps)
    div = state_divergence(states_q, states_fp)
    layer = layer_output_errors(params, packed, stats, max_rows=cfg.layer_rows, cfg=v.cfg)
    worst = sorted(layer.items(), key=lambda kv: -kv[1])[:5]
    summ = summarize(packed)
    r = VariantResult(
        name=v.name, calib_batches=n if v.cfg.rules else 0, layers_quantized=summ.layers_quantized,
        bytes_fp=summ.weight_bytes_fp, bytes_packed=summ.weight_bytes_packed, calib_s=calib_s,
        pack_s=pack_s, action_err_mean=act_mean, action_err_p99=act_p99,
        step_err_mean=[float(x) for x in step.mean(axis=1)],
        step_err_p99=[float(np.percentile(x, 99)) for x in step],
        drift=drift_at(div), drift_curve=[float(x) for x in div],
        exceeds_at=first_exceeding(div, cfg.tolerance),
        layer_err_mean=float(np.mean(list(layer.values()))) if layer else float("nan"),
        layer_err_worst=worst, balance_s=balance_s)
    results.append(r)
    log(f"{v.name}: action err {act_mean:.4f} (p99 {act_p99:.4f}), drift@{cfg.chunks} "
        f"{div[-1]:.4f}, pack {pack_s:.1f} s")
  return EvalReport(model=model, size=size, config=dataclasses.asdict(cfg), results=results)


# ------------------------------------------------------------------------------------------------
# Output.


def format_markdown(report: EvalReport) -> str:
  """The main table, a per-flow-step table and the worst layers, as markdown."""
  c = report.config
  hs = [h for h in HORIZONS if h <= c["chunks"]]
  head = ["variant", "calib", "bytes/bf16", "calib s", "pack s", "act err mean", "act err p99",
          *[f"drift@{h}" for h in hs], f"> {c['tolerance']:g} at", "layer err mean"]
  lines = [f"{report.model} ({report.size}): {c['episodes']} episodes x {c['chunks']} chunks, "
           f"{c['num_steps']} flow steps, seed {c['seed']}; drift = mean L2 state distance to the "
           f"FP rollout; tolerance {c['tolerance']:g}", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in report.results:
    ratio = r.bytes_packed / r.bytes_fp if r.bytes_fp else float("nan")
    ex = "never" if r.exceeds_at is None else str(r.exceeds_at)
    lines.append("| " + " | ".join([
        r.name, str(r.calib_batches), f"{ratio:.3f}", f"{r.calib_s:.1f}", f"{r.pack_s:.1f}",
        f"{r.action_err_mean:.4f}", f"{r.action_err_p99:.4f}",
        *[f"{r.drift[h]:.4f}" for h in hs], ex, f"{r.layer_err_mean:.4f}"]) + " |")
  s = c["num_steps"]
  steps = sorted({0, s // 2, s - 1})
  lines += ["", "Velocity relative error per flow step (mean / p99; step 0 is t = 1):", "",
            "| variant | " + " | ".join(f"step {i}" for i in steps) + " |",
            "|---|" + "---|" * len(steps)]
  for r in report.results:
    lines.append(f"| {r.name} | " + " | ".join(
        f"{r.step_err_mean[i]:.4f} / {r.step_err_p99[i]:.4f}" for i in steps) + " |")
  lines += ["", "Worst layers (output error on calibration samples):", "",
            "| variant | 5 worst layers |", "|---|---|"]
  for r in report.results:
    short = ", ".join(f"{n.replace(GEMMA_LAYERS + '/', '')} {e:.3f}"
                      for n, e in r.layer_err_worst)
    lines.append(f"| {r.name} | {short} |")
  return "\n".join(lines)


def plot_drift(report: EvalReport, path: str) -> None:
  """PNG: state divergence vs chunks, one line per variant, with the tolerance."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = plt.get_cmap("tab20").colors
  for i, r in enumerate(report.results):  # distinct colour and dash per variant (> 10 lines)
    ax.plot(np.arange(len(r.drift_curve)), r.drift_curve, marker=".", label=r.name,
            color=colors[(2 * i) % 20 + (i // 10) % 2], ls=("-", "--", ":")[i % 3])
  ax.axhline(report.config["tolerance"], color="k", ls="--", lw=0.8, label="tolerance")
  ax.set_yscale("symlog", linthresh=1e-3)
  ax.set_ylim(bottom=0.0)  # distances are non-negative: no mirrored negative half
  ax.set_xlabel("chunks executed")
  ax.set_ylabel("mean L2 state distance to FP")
  ax.set_title(f"closed-loop drift, {report.model} ({report.size})")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
