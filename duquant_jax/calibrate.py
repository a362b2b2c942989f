"""Calibration: activation statistics of every selected linear's input, over a stream of batches.

DuQuant (Lin et al., NeurIPS 2024) builds smoothing, rotations and permutations from calibration
activations. `calibrate` runs what `Policy.sample_actions` runs (the prefix through the LLM once, then
`num_steps` Euler flow steps of the action expert) on every batch of a stream and accumulates, per
selected linear, the streaming statistics of `duquant_jax.stats.ChannelStats`. It is one jitted program:
a `jax.lax.scan` over the batch axis, called on chunks of `CalibConfig.chunk_size` batches so that a
progress bar can show throughput; memory does not depend on the number of batches.

What is captured: Gemma's `Einsum` modules sow their input as `w_input` and `FeedForward` sows
`gating_einsum_input` / `linear_input` (models/gemma.py); flax `Dense` / `DenseGeneral` inputs (SigLIP,
the action/state/time heads, pi0.5's adaptive norms) are captured by method interception when the
config selects their `kernel`. Every linear is named by its weight's '/'-joined param path.

Token masks: in the prefix pass, prompt padding (`tokenized_prompt_mask` False) and the patches of
missing cameras (`image_masks` False) are not counted; every suffix (state + action) token is valid.

Axes: G batch groups, B batch, T tokens, L layers, K contraction size, N rows = B * T, S flow steps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import time
from typing import Any, Iterator, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from duquant_jax import openpi_paths
from duquant_jax import stats as st
from duquant_jax.calib_data import validate_batches
from duquant_jax.gptq import hessian_block_for
from duquant_jax.layouts import linear_layouts
from duquant_jax.models.config import IMAGE_KEYS
from duquant_jax.models.pi0 import Pi0, Policy, flow_times
from duquant_jax.treepath import get_path, path_str

# Every Gemma linear of both experts (`duquant_jax.openpi_paths`).
DEFAULT_SELECT = openpi_paths.pattern(("q", "kv", "attn_vec", "gating", "linear"),
                                      openpi_paths.EXPERTS)
PREFIX, SUFFIX = "prefix", "suffix"


def select_for(cfg: Any, params: Any) -> str:
  """The `CalibConfig.select` regex covering every linear that `cfg` (a QuantConfig) quantizes.

  `DEFAULT_SELECT` (all Gemma linears) when the rules stay inside it, so the stats of existing
  configs do not change; otherwise DEFAULT_SELECT widened by the exact paths of the other quantized
  linears (e.g. SigLIP's), which the rules' smoothing and greedy rotations need stats for.

  Args:
    cfg: a `duquant_jax.QuantConfig`. params: the float param tree (arrays or ShapeDtypeStructs).
  """
  extra = [p for p in linear_layouts(params)
           if cfg.rule_for(p) is not None and not re.fullmatch(DEFAULT_SELECT, p)]
  return "|".join([DEFAULT_SELECT, *(re.escape(p) for p in sorted(extra))])


def hessian_for(cfg: Any, params: Any) -> str | None:
  """The `CalibConfig.hessian` regex: the exact paths of the linears whose rule rounds with GPTQ
  (`LayerRule.rounding == "gptq"`), or None when no rule does (no Hessian is accumulated).

  Args:
    cfg: a `duquant_jax.QuantConfig`. params: the float param tree (arrays or ShapeDtypeStructs).
  """
  paths = [p for p in linear_layouts(params)
           if (r := cfg.rule_for(p)) is not None and r.rounding == "gptq"]
  return "|".join(re.escape(p) for p in sorted(paths)) or None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibConfig:
  """What to capture and how much to keep. Hashable: a static argument of the jitted program."""

  select: str = DEFAULT_SELECT  # regex, re.fullmatch on the weight path; default all Gemma linears
  num_steps: int = 10  # flow steps per batch, as in sample_actions
  per_step: bool = False  # also keep absmax per flow step (S, L, K) for the expert's linears
  num_samples: int = 128  # R: reservoir rows per linear for the greedy rotation search
  hist: st.HistSpec = st.HistSpec()  # histogram bins
  chunk_size: int = 16  # batches per jitted scan call (progress granularity)
  progress: bool = True  # tqdm bar over chunks with throughput
  # Regex of weight paths whose input Hessian X^T X (float32, per stacked layer) is accumulated,
  # for GPTQ rounding (`hessian_for`); None: none. A linear sharing another's input gets it when
  # either path matches.
  hessian: str | None = None
  # HB: inputs wider than this keep only the Hessian's diagonal blocks of HB channels (memory per
  # layer K * HB * 4 bytes: 128 MiB for gemma_2b's 16384-wide down projection, against 1 GiB dense).
  # Where HB does not divide K, the block is K's largest divisor below HB (`hessian_block_for`).
  hessian_block: int = 2048

  def __post_init__(self):
    try:
      re.compile(self.select)
    except re.error as e:
      raise ValueError(f"CalibConfig.select {self.select!r} is not a valid regex: {e}") from None
    for name in ("num_steps", "num_samples", "chunk_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"CalibConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.hessian is not None:
      try:
        re.compile(self.hessian)
      except re.error as e:
        raise ValueError(f"CalibConfig.hessian {self.hessian!r} is not a valid regex: {e}") from None
    if int(self.hessian_block) < 1:
      raise ValueError(f"CalibConfig.hessian_block must be >= 1, got {self.hessian_block}")
    if not isinstance(self.hist, st.HistSpec):
      raise TypeError(f"CalibConfig.hist must be a HistSpec, got {type(self.hist).__name__}")


@flax.struct.dataclass
class CalibStats:
  """Read-only mapping weight path -> `ChannelStats`, plus the number of batches seen.

  A pytree whose leaves are arrays (the config is static), so it can be jitted over and saved with
  orbax (`save_stats` / `load_stats`, or `to_tree` to embed it in another checkpoint).
  """

  layers: dict[str, st.ChannelStats]
  num_batches: jax.Array  # () int32
  num_steps: int = flax.struct.field(pytree_node=False, default=10)
  select: str = flax.struct.field(pytree_node=False, default=DEFAULT_SELECT)

  def __getitem__(self, path: str) -> st.ChannelStats:
    if path not in self.layers:
      raise KeyError(f"no calibration stats for {path!r}; have {sorted(self.layers)}")
    return self.layers[path]

  def __contains__(self, path: object) -> bool:
    return path in self.layers

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self.layers))

  def __len__(self) -> int:
    return len(self.layers)

  def keys(self):
    return sorted(self.layers)

  def items(self):
    return [(k, self.layers[k]) for k in sorted(self.layers)]

  def values(self):
    return [self.layers[k] for k in sorted(self.layers)]


@flax.struct.dataclass
class Capture:
  """Raw inputs of one linear on one batch: rows (L, N, K), or (S, L, N, K) for a flow-step linear;
  mask (N,) marks valid rows. Unstacked linears have L = 1."""

  rows: jax.Array
  mask: jax.Array
  phase: str = flax.struct.field(pytree_node=False, default=PREFIX)


# ---------------------------------------------------------------------------------------------------
# Capture: which sown name belongs to which weight, and how many trailing axes are contracted.

_SOWN = (  # (sown name, weight name that replaces it, contracted trailing axes of the sown value)
    ("w_input", "w", None),  # Einsum: attn_vec_einsum contracts (N, H), the others D
    ("gating_einsum_input", "gating_einsum", 1),
    ("linear_input", "linear", 1),
    ("kernel_input", "kernel", 1),  # Dense / DenseGeneral, flattened by `_dense_interceptor`
)


def _weight_of(sown_path: str) -> tuple[str, int] | None:
  """'<module>/w_input' -> ('<module>/w', contracted axes); None for other intermediates."""
  head, _, name = sown_path.rpartition("/")
  for sown, weight, k_axes in _SOWN:
    if name == sown:
      if k_axes is None:
        k_axes = 2 if re.fullmatch(r"attn_vec_einsum(_\d+)?", head.rpartition("/")[2]) else 1
      return f"{head}/{weight}", k_axes
  return None


def _dense_interceptor(select: re.Pattern):
  """Sows the input of every selected flax Dense / DenseGeneral as (B, T, K) under `kernel_input`."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)):
      path = "/".join(module.path) + "/kernel"
      if select.fullmatch(path):
        x = args[0] if args else kwargs["inputs"]
        axes = (-1,) if isinstance(module, nn.Dense) else module.axis
        axes = tuple(a % x.ndim for a in ((axes,) if isinstance(axes, int) else axes))
        rest = [a for a in range(x.ndim) if a not in axes]
        x = jnp.transpose(x, rest + list(axes))
        k = int(np.prod([x.shape[len(rest) + i] for i in range(len(axes))]))
        module.sow("intermediates", "kernel_input", x.reshape(x.shape[0], -1, k))
    return next_fun(*args, **kwargs)

  return interceptor


def _apply(policy: Policy, params, select: re.Pattern, *args, method):
  """module.apply with "intermediates" mutable -> (output, {weight path: [sown value, ...]})."""
  with nn.intercept_methods(_dense_interceptor(select)):
    out, state = policy.module.apply({"params": params}, *args, method=method,
                                     mutable=["intermediates"])
  found: dict[str, list[tuple[jax.Array, int]]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.get("intermediates", {}))[0]:
    # Leaves sit at '<module path>/<sown name>/<call index>'.
    p = path_str(path)
    sown, _, _ = p.rpartition("/")
    w = _weight_of(sown)
    if w is not None and select.fullmatch(w[0]):
      found.setdefault(w[0], []).append((leaf, w[1]))
  return out, found


def _rows(values: list[tuple[jax.Array, int]], masks: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Sown values [(L?, B, T, *K), ...] and masks [(B, T), ...] -> rows (L, N, K), mask (N,)."""
  rows, flat_masks = [], []
  for (x, k_axes), m in zip(values, masks, strict=True):
    k = int(np.prod(x.shape[x.ndim - k_axes:]))
    lead = x.ndim - k_axes - 2  # 1 for a stacked (scanned) linear, 0 otherwise
    if lead not in (0, 1):
      raise ValueError(f"unexpected captured shape {x.shape} with {k_axes} contracted axes")
    x = x.reshape(x.shape[:lead] + (-1, k))
    rows.append(x if lead else x[None])
    flat_masks.append(m.reshape(-1))
  return jnp.concatenate(rows, axis=1), jnp.concatenate(flat_masks)


def _token_masks(path: str, values: list[tuple[jax.Array, int]], phase: str, obs,
                 prefix_mask: jax.Array | None) -> list[jax.Array]:
  """(B, T) validity of every sown value of `path`: padding and missing cameras are invalid."""
  out = []
  for i, (x, k_axes) in enumerate(values):
    b, t = x.shape[x.ndim - k_axes - 2: x.ndim - k_axes]
    if phase == SUFFIX:
      out.append(jnp.ones((b, t), bool))
    elif openpi_paths.is_vision(path):
      # One call over all cameras' images, camera-major in IMAGE_KEYS order (the model's), or
      # one call per camera.
      cams = [obs.image_masks[key] for key in IMAGE_KEYS]
      if len(values) == 1 and b == sum(c.shape[0] for c in cams):
        valid = jnp.concatenate(cams)
      elif len(values) == len(IMAGE_KEYS):
        valid = cams[i]
      else:
        raise ValueError(f"{path}: expected one vision call over the {len(IMAGE_KEYS)} cameras' "
                         f"images or one per camera, got {len(values)} of batch {b}")
      out.append(jnp.broadcast_to(valid[:, None], (b, t)))
    else:
      if prefix_mask.shape != (b, t):
        raise ValueError(f"{path}: captured {x.shape} does not match the prefix mask {prefix_mask.shape}")
      out.append(prefix_mask)
  return out


def _prefix_pass(policy, params, obs, select):
  """-> kv_cache, prefix_mask (B, T), {path: (rows (L, N, K), mask (N,))}."""
  (kv_cache, prefix_mask), found = _apply(policy, params, select, obs, method=Pi0.fill_cache)
  caps = {p: _rows(v, _token_masks(p, v, PREFIX, obs, prefix_mask)) for p, v in found.items()}
  return kv_cache, prefix_mask, caps


def _suffix_step(policy, params, obs, kv_cache, prefix_mask, x_t, t, select):
  """One flow step -> v_t (B, A, action_dim), {path: (rows (L, N, K), mask (N,))}."""
  b = x_t.shape[0]
  v_t, found = _apply(policy, params, select, obs, kv_cache, prefix_mask, x_t,
                      jnp.broadcast_to(t, (b,)), method=Pi0.velocity)
  caps = {p: _rows(v, _token_masks(p, v, SUFFIX, obs, None)) for p, v in found.items()}
  return v_t, caps


def _noise(policy: Policy, key: jax.Array, batch_size: int) -> jax.Array:
  c = policy.cfg
  return jax.random.normal(key, (batch_size, c.action_horizon, c.action_dim))


def _batch_keys(rng: jax.Array, index) -> tuple[jax.Array, jax.Array]:
  """(noise key, reservoir-priority key) of batch `index` of the stream."""
  k = jax.random.fold_in(rng, index)
  return jax.random.fold_in(k, 0), jax.random.fold_in(k, 1)


@functools.partial(jax.jit, static_argnames=("policy", "select", "num_steps"))
def _capture(policy, params, obs, noise, select: str, num_steps: int):
  sel = re.compile(select)
  kv_cache, prefix_mask, prefix = _prefix_pass(policy, params, obs, sel)
  dt = -1.0 / num_steps

  def step(x_t, t):
    v_t, caps = _suffix_step(policy, params, obs, kv_cache, prefix_mask, x_t, t, sel)
    return x_t + dt * v_t, caps

  _, suffix = jax.lax.scan(step, noise, flow_times(num_steps))
  out = {p: Capture(rows=r, mask=m, phase=PREFIX) for p, (r, m) in prefix.items()}
  out.update({p: Capture(rows=r, mask=m[0], phase=SUFFIX) for p, (r, m) in suffix.items()})
  return out


def capture_single_batch(policy: Policy, params, obs, *, rng: jax.Array,
                         select: str = DEFAULT_SELECT, num_steps: int = 10) -> dict[str, Capture]:
  """Raw inputs of every selected linear on one batch, as `calibrate` sees them.

  Args:
    policy: the `Policy` (its config fixes the model); params: its param tree.
    obs: one `Observation` batch (B, ...).
    rng: key of the initial flow noise x_1 ~ N(0, I) (B, A, action_dim).
    select: regex on weight paths. num_steps: flow steps.

  Returns:
    {weight path: Capture}: prefix linears rows (L, N, K), flow-step linears rows (S, L, N, K);
    N = B * T tokens with mask (N,). For statistics, use `calibrate` on a group of one batch.
  """
  policy._check(params, obs)
  return _capture(policy, params, obs, _noise(policy, rng, obs.batch_size), select, num_steps)


# ---------------------------------------------------------------------------------------------------
# The accumulating program.

@dataclasses.dataclass(frozen=True, kw_only=True)
class _Entry:
  path: str
  phase: str  # PREFIX (LLM, vision) or SUFFIX (flow steps: expert, heads)
  layers: int  # L, or 0 for an unstacked linear
  channels: int  # K
  same_input_as: str | None = None  # a selected linear whose input this one shares


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static layout of what is captured, in path order."""

  entries: tuple[_Entry, ...]

  def computed(self, phase: str | None = None) -> list[_Entry]:
    return [e for e in self.entries if e.same_input_as is None and phase in (None, e.phase)]


def _make_plan(policy: Policy, params, obs, cfg: CalibConfig) -> _Plan:
  shapes = jax.eval_shape(
      lambda p, o: _capture(policy, p, o, _noise(policy, jax.random.key(0), o.batch_size),
                            cfg.select, 1), params, obs)
  if not shapes:
    raise ValueError(f"CalibConfig.select {cfg.select!r} matches no linear of the model; linears are "
                     f"named by weight path, e.g. 'PaliGemma/llm/layers/attn/q_einsum/w'")
  entries = []
  for path, cap in sorted(shapes.items()):
    l, _, k = cap.rows.shape[-3:]
    entries.append(_Entry(path=path, phase=cap.phase, layers=0 if _is_unstacked(params, path) else l,
                          channels=k, same_input_as=openpi_paths.input_owner(path, shapes)))
  return _Plan(tuple(entries))


def _is_unstacked(params, path: str) -> bool:
  """Only flax Dense kernels outside `nn.scan` lack the depth axis: kernel ndim == 2 there."""
  return path.endswith("/kernel") and get_path(params, path).ndim == 2


def _hessian_block(e: _Entry, plan: _Plan, cfg: CalibConfig) -> int | None:
  """HB for entry e's Hessian, or None if no linear reading its input asks for one."""
  if cfg.hessian is None:
    return None
  readers = [x.path for x in plan.entries if e.path in (x.path, x.same_input_as)]
  if not any(re.fullmatch(cfg.hessian, p) for p in readers):
    return None
  return hessian_block_for(e.channels, cfg.hessian_block)



def _init_stats(plan: _Plan, cfg: CalibConfig) -> dict[str, st.ChannelStats]:
  return {e.path: st.init_channel_stats(
      num_layers=max(e.layers, 1), num_channels=e.channels, num_samples=cfg.num_samples,
      spec=cfg.hist, num_steps=cfg.num_steps if (cfg.per_step and e.phase == SUFFIX) else None,
      hessian_block=_hessian_block(e, plan, cfg))
          for e in plan.computed()}


def _priority(key: jax.Array, n: int) -> jax.Array:
  return jax.random.uniform(key, (n,), jnp.float32)


def _update_batch(policy: Policy, params, stats: dict, obs, index, valid, rng,
                  cfg: CalibConfig, plan: _Plan) -> dict:
  """Accumulates batch `index` of the stream (all of it ignored when `valid` is False)."""
  sel = re.compile(cfg.select)
  noise_key, prio_key = _batch_keys(rng, index)
  kv_cache, prefix_mask, prefix = _prefix_pass(policy, params, obs, sel)
  stats = dict(stats)
  for e in plan.computed(PREFIX):
    rows, mask = prefix[e.path]
    prio = _priority(jax.random.fold_in(prio_key, cfg.num_steps), rows.shape[1])
    stats[e.path] = st.accumulate(stats[e.path], rows, mask & valid, prio)

  suffix_paths = [e.path for e in plan.computed(SUFFIX)]
  dt = -1.0 / cfg.num_steps

  def step(carry, inp):
    x_t, acc = carry
    i, t = inp
    v_t, caps = _suffix_step(policy, params, obs, kv_cache, prefix_mask, x_t, t, sel)
    acc = dict(acc)
    step_max = {}
    for path in suffix_paths:
      rows, mask = caps[path]
      mask = mask & valid
      acc[path] = st.accumulate(acc[path], rows, mask, _priority(jax.random.fold_in(prio_key, i),
                                                                 rows.shape[1]))
      step_max[path] = st.masked_absmax(rows, mask)
    return (x_t + dt * v_t, acc), step_max

  noise = _noise(policy, noise_key, obs.batch_size)
  carry0 = (noise, {p: stats[p] for p in suffix_paths})
  (_, acc), step_max = jax.lax.scan(step, carry0, (jnp.arange(cfg.num_steps), flow_times(cfg.num_steps)))
  for path in suffix_paths:
    stats[path] = acc[path]
    if cfg.per_step:
      stats[path] = st.update_step_absmax(stats[path], step_max[path])
  return stats


@functools.partial(jax.jit, static_argnames=("policy", "cfg", "plan"), donate_argnames=("stats",))
def _run_chunk(policy, params, stats, obs_chunk, indices, valid, rng, *, cfg, plan):
  """lax.scan of `_update_batch` over a chunk: obs_chunk (C, B, ...), indices (C,), valid (C,)."""

  def body(s, inp):
    obs, index, ok = inp
    return _update_batch(policy, params, s, obs, index, ok, rng, cfg, plan), None

  stats, _ = jax.lax.scan(body, stats, (obs_chunk, indices, valid))
  return stats


def _chunk(batches, start: int, stop: int, size: int):
  """Batches [start, stop) as device arrays (size, B, ...); a short last chunk repeats its last batch."""
  def take(x):
    x = x[start:stop]
    if stop - start < size:
      x = np.asarray(x)[np.minimum(np.arange(size), stop - start - 1)]
    return jnp.asarray(x)
  return jax.tree.map(take, batches)


def _finalize(stats: dict, plan: _Plan, num_batches: int, cfg: CalibConfig) -> CalibStats:
  layers = {}
  for e in plan.entries:
    src = stats[e.same_input_as or e.path]
    layers[e.path] = src if e.layers else st.squeeze_layers(src)
  return CalibStats(layers=layers, num_batches=jnp.asarray(num_batches, jnp.int32),
                    num_steps=cfg.num_steps, select=cfg.select)


def calibrate(policy: Policy, params, batches, cfg: CalibConfig = CalibConfig(), *,
              rng: jax.Array) -> CalibStats:
  """Calibration statistics of every linear selected by `cfg.select`, over a stream of batches.

  The issue's `calibrate(policy_fn, params, batches, cfg)`: the policy is passed as the `Policy`
  object, whose `module` methods `Pi0.fill_cache` and `Pi0.velocity` are run with the same noise
  schedule as `sample_actions` (the expert sees the FP policy's own trajectory x_t).

  Args:
    policy: the `Policy`; params: its param tree (float32 or bf16).
    batches: an `Observation` whose leaves have leading axes (G, B, ...) (numpy or jax arrays; chunks
      of `cfg.chunk_size` batches are moved to the device in turn), e.g. from `calibration_batches`
      or `load_npz_batches`.
    cfg: what to capture and keep.
    rng: key; batch g draws its flow noise and reservoir keys from fold_in(rng, g), so the result does
      not depend on `cfg.chunk_size`.

  Returns:
    CalibStats mapping weight path -> ChannelStats. Prefix (LLM, vision) linears count B * valid
    prefix tokens per batch; flow-step (expert, heads) linears count B * S tokens per step, pooled
    over the `num_steps` steps (and kept per step in `step_absmax` when `cfg.per_step`).

  Raises:
    ValueError: bad batches (naming the key: shape, dtype, NaN/Inf, empty), or a `select` that
      matches no linear.
  """
  g, _ = validate_batches(batches, policy.cfg)
  first = jax.tree.map(lambda x: jnp.asarray(x[0]), batches)
  policy._check(params, first)
  plan = _make_plan(policy, params, first, cfg)
  stats = _init_stats(plan, cfg)
  c = min(cfg.chunk_size, g)
  bar = tqdm(total=g, unit="batch", desc="calibrate", disable=not cfg.progress)
  t_start = t_first = time.perf_counter()
  for start in range(0, g, c):
    stop = min(start + c, g)
    index = np.arange(start, start + c)
    stats = _run_chunk(policy, params, stats, _chunk(batches, start, stop, c),
                       jnp.asarray(np.minimum(index, g - 1), jnp.int32), jnp.asarray(index < g), rng,
                       cfg=cfg, plan=plan)
    jax.block_until_ready(stats)
    now = time.perf_counter()
    if start == 0:  # the first chunk includes compilation: throughput is measured after it
      t_first = now
      bar.set_postfix(first_chunk_s=f"{now - t_start:.1f}")
    else:
      rate = (stop - c) / (now - t_first)
      bar.set_postfix(batch_per_s=f"{rate:.2f}", obs_per_s=f"{rate * first.batch_size:.1f}",
                      first_chunk_s=f"{t_first - t_start:.1f}", refresh=False)
    bar.update(stop - start)
  bar.close()
  return _finalize(stats, plan, g, cfg)


# ---------------------------------------------------------------------------------------------------
# Saving stats (orbax), as arrays only.

def to_tree(stats: CalibStats) -> dict[str, Any]:
  """A nested dict of arrays (no '/' in keys) for orbax; `from_tree` inverts it."""
  meta = {"num_steps": stats.num_steps, "select": stats.select, "paths": list(stats.keys())}
  return {
      "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8).copy(),
      "num_batches": np.asarray(stats.num_batches),
      "layers": {str(i): st.to_tree(stats[p]) for i, p in enumerate(stats.keys())},
  }


def from_tree(tree: Mapping[str, Any]) -> CalibStats:
  meta = json.loads(bytes(np.asarray(tree["meta"], np.uint8)).decode())
  layers = {p: st.from_tree(tree["layers"][str(i)]) for i, p in enumerate(meta["paths"])}
  return CalibStats(layers=layers, num_batches=jnp.asarray(tree["num_batches"]),
                    num_steps=int(meta["num_steps"]), select=meta["select"])


def save_stats(path, stats: CalibStats) -> None:
  """Writes stats as an orbax PyTree checkpoint at `path` (a new directory)."""
  with ocp.PyTreeCheckpointer() as ckpt:
    ckpt.save(pathlib.Path(path).absolute(), jax.tree.map(np.asarray, to_tree(stats)))


def load_stats(path) -> CalibStats:
  """Reads stats written by `save_stats`."""
  with ocp.PyTreeCheckpointer() as ckpt:
    return from_tree(ckpt.restore(pathlib.Path(path).absolute()))
