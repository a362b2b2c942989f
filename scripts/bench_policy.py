"""Full-size pi0 / pi0.5 `sample_actions`, bf16 vs packed W4A8: latency, compile time, weight memory.

Usage (GPU): python scripts/bench_policy.py [--models pi0,pi05] [--batches 1,8] [--size full]
             [--preset recommended] [--all-linears] [--repeats 10] [--rounds 3]
             [--variants auto/auto,xla/xla] [--unroll off,on] [--attention einsum,cudnn]
             [--xla default,cmdbuf] [--breakdown]

Random bf16 weights and synthetic stats (this measures speed and memory, not accuracy). Every
function of one setting (bf16, openpi's form, each packed variant) is compiled ahead of time, then
timed interleaved: `rounds` rounds, each `repeats` calls of every function in turn. Latency is the
median over all calls of one compiled `sample_actions` (10 flow steps); spread is the range of
its round medians, the run-to-run noise the ratios have to clear.
Weight memory: bytes of every param leaf on the device (int4 counts half a byte), all params and the
quantized layers alone.
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import sys
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax import kernels, runtime
from duquant_jax.models import ATTENTIONS, Policy, get_policy, make_observation
from duquant_jax.quantize import quantize_params, summarize
from duquant_jax.lab.synthetic_stats import synthetic_stats
from duquant_jax.kernels import dispatch, gated, mosaic_gpu, w4a8, weight_only
from duquant_jax.runtime import Execution, PackedRuntime

from bench_pack import bench_config, random_params, speed_only
from duquant_jax.packed import PackedLinear
from duquant_jax.packed import tree_nbytes as tree_bytes


def _auto_none(choice: str):
  """A --variants choice as an implementation name ("auto" -> None: the library's choice)."""
  return None if choice == "auto" else choice


@flax.struct.dataclass
class FreeLinear(PackedLinear):
  """A packed linear whose matmul costs (almost) nothing: x2 (M, K) -> x2[:, :1] broadcast to (M, N)
  (under `bound_linears`).

  For `--bound` only: a policy with every packed linear replaced by this one runs everything except
  those linears' transforms, matmuls and weight reads, so its latency is the floor that ANY
  quantization of those layers could reach with the rest of the network unchanged.
  """


@flax.struct.dataclass
class GemmOnlyLinear(PackedLinear):
  """A packed linear whose activation side costs (almost) nothing (under `bound_linears`): no
  online transform, and for W4A8 int8 codes from a plain cast with unit scales, then the same W4A8
  (or weight-only) matmul on the same packed weight.

  For `--bound` only: the latency any fusion of the transforms and quantizers into the matmuls
  could reach with the matmul kernels as they are.
  """


@contextlib.contextmanager
def bound_linears():
  """Within this context (around the call that traces), `duquant_jax.runtime` runs FreeLinear and
  GemmOnlyLinear leaves as their docstrings say; other packed linears run as they do outside."""
  real = runtime.matmul, runtime.quantize_input, runtime.share_key

  def matmul(w, x2, execution=runtime.AUTO, *, quantized=None, layer=None):
    if isinstance(w, FreeLinear):
      return x2[:, :1] * jnp.ones((1, w.out_features), x2.dtype)
    return real[0](w, x2, execution, quantized=quantized, layer=layer)

  def quantize_input(w, x2, execution=runtime.AUTO):
    if not isinstance(w, GemmOnlyLinear):
      return real[1](w, x2, execution)
    if not w.quantizes(x2.shape[0]):
      return x2
    m = x2.shape[0]
    zx = None if w.act_symmetric else jnp.zeros((m, 1), jnp.float32)
    return x2.astype(jnp.int8), jnp.ones((m, 1), jnp.float32), zx

  def share_key(w, execution=runtime.AUTO):
    if isinstance(w, (FreeLinear, GemmOnlyLinear)):
      return None  # nothing to share: no transform or quantizer runs
    return real[2](w, execution)

  runtime.matmul, runtime.quantize_input, runtime.share_key = matmul, quantize_input, share_key
  try:
    yield
  finally:
    runtime.matmul, runtime.quantize_input, runtime.share_key = real


def _swap_linears(tree, cls):
  """`tree` with every PackedLinear replaced by a `cls` of the same fields."""
  def swap(leaf):
    if isinstance(leaf, PackedLinear):
      return cls(**{f.name: getattr(leaf, f.name) for f in dataclasses.fields(leaf)})
    return leaf
  return jax.tree.map(swap, tree, is_leaf=lambda v: isinstance(v, PackedLinear))


def free_linears(tree):
  """`tree` with every PackedLinear replaced by a FreeLinear of the same fields."""
  return _swap_linears(tree, FreeLinear)


def gemm_only_linears(tree):
  """`tree` with every PackedLinear replaced by a GemmOnlyLinear of the same fields."""
  return _swap_linears(tree, GemmOnlyLinear)


def unshared_inputs(tree):
  """`tree` with `input_group` cleared: every linear transforms and quantizes its input alone."""
  return jax.tree.map(lambda n: n.replace(input_group=None) if isinstance(n, PackedLinear) else n,
                      tree, is_leaf=lambda n: isinstance(n, PackedLinear))


# Named XLA compiler option sets (`--xla`), passed to `jax.jit(compiler_options=...)` of both the
# bf16 and the packed policy. Command buffers replay a run of kernels as one CUDA graph: fewer
# host launches where the policy is launch-bound (thousands of kernels of a few us each).
XLA_OPTIONS = {
    "default": {},
    "nocmdbuf": {"xla_gpu_enable_command_buffer": ""},
    "cmdbuf": {"xla_gpu_enable_command_buffer":
               "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
               "xla_gpu_graph_min_graph_size": 1},
    "dsfusion": {"xla_gpu_enable_dynamic_slice_fusion": True},
}


def compile_policy(policy, params, obs, num_steps=10, xla="default"):
  """`policy.sample_actions` with `num_steps` flow steps, compiled ahead of time for these
  arguments: (compiled, compile s). The compiled function cannot trace again, so a variant's
  dispatch overrides need only surround this call."""
  fn = jax.jit(functools.partial(policy.sample_actions, num_steps=num_steps),
               compiler_options=XLA_OPTIONS[xla] or None)
  t = time.perf_counter()
  compiled = fn.lower(params, obs, jax.random.key(0)).compile()
  return compiled, time.perf_counter() - t


def time_interleaved(calls, obs, repeats: int, rounds: int) -> list[tuple[float, float]]:
  """Latency of each (compiled, params) of `calls`, timed in turn: each round times `repeats`
  calls of every entry before the next round starts, so a drift of the machine during the process
  (clocks, allocator) reaches all entries alike.

  Returns:
    per entry, (median ms over all its calls, spread ms: its largest minus its smallest round
    median).
  """
  rng = jax.random.key(0)
  for compiled, params in calls:  # first run: allocations, autotuning caches
    jax.block_until_ready(compiled(params, obs, rng))
  # Every timed call's key, made before any timing: no key derivation inside a timed call.
  keys = jax.block_until_ready([jax.random.fold_in(rng, i) for i in range(rounds * repeats)])
  times = [[] for _ in calls]
  medians = [[] for _ in calls]
  for r in range(rounds):
    for j, (compiled, params) in enumerate(calls):
      ts = []
      for i in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, obs, keys[r * repeats + i]))
        ts.append(1e3 * (time.perf_counter() - t))
      times[j] += ts
      medians[j].append(float(np.median(ts)))
  return [(float(np.median(t)), max(m) - min(m)) for t, m in zip(times, medians)]


def _rules_but_act_bits(cfg):
  return (tuple(dataclasses.replace(r, act_bits=8, act_min_tokens=0) for r in cfg.rules),
          cfg.embeddings)


def _repack_activations(packs, cfg):
  """An earlier pack whose config differs from `cfg` only in rules' `act_bits` / `act_min_tokens`,
  with each linear's set by `cfg`'s rules; None if there is none. The packed weights and transforms do not
  depend on act_bits (same codes, scales and transforms), and full-size packing takes ~90 s."""
  for cfg0, packed, *_ in packs:
    if _rules_but_act_bits(cfg0) == _rules_but_act_bits(cfg):
      def act_bits(path, leaf):
        if not isinstance(leaf, PackedLinear):
          return leaf
        rule = cfg.rule_for("/".join(str(getattr(k, "key", k)) for k in path))
        return leaf.replace(act_bits=rule.act_bits, act_min_tokens=rule.act_min_tokens)
      return jax.tree_util.tree_map_with_path(act_bits, packed,
                                              is_leaf=lambda v: isinstance(v, PackedLinear))
  return None


def _configured(policy, unroll, attention):
  """The policy with its layer scans unrolled or not and computing attention by `attention`
  (`Pi0Config.attention`); the same params run either way."""
  if unroll not in ("off", "on"):
    raise SystemExit(f"--unroll takes off,on; got {unroll!r}")
  cfg = dataclasses.replace(policy.cfg, unroll_layers=unroll == "on", attention=attention)
  return dataclasses.replace(policy, cfg=cfg)


@contextlib.contextmanager
def _patched_attr(module, name: str, value, on: bool):
  """`module.name` (a function, threshold or table the library reads at trace time) set to
  `value` while `on`."""
  real = getattr(module, name)
  if on:
    setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, real)


# Tokens of a flow step's matmuls at batch 1 (the suffix's 50-51 tokens), up to which `flowunfused`
# runs the MLPs as two linears and `wopallas` the weight-only matmuls on the Pallas kernel.
FLOW_TOKENS = 64
# `wopallas`: weight-only matmuls of flow-step size (the W8 expert attention at batch 1) on the
# Pallas kernel, which reads a stacked weight in place, instead of XLA's GEMM on a slice.
WEIGHT_ONLY_PALLAS = (dispatch.Rule(
    regime=f"bench_policy: Pallas weight-only kernel up to {FLOW_TOKENS} tokens",
    platforms=frozenset({dispatch.HOPPER, dispatch.OTHER_GPU}),
    when=lambda p: p.m <= FLOW_TOKENS and w4a8._pallas_takes(p.m, p.n, p.k, p.g),
    implementation="pallas"),)


# The variants' dispatch flags (`--variants MATMUL/TRANSFORM/FLAG...`), each a `dispatch_overrides`
# case.
DISPATCH_FLAGS = ("unfused", "flowunfused", "kernelprefix", "wopallas", "tiles128", "gatedint4",
                  "gatedws", "int8mosaic")
_FLAG_SYNTAX = "".join(f"[/{f}]" for f in DISPATCH_FLAGS)


def _gated_mlp_above(tokens: int):
  """`runtime.gated_mlp` declining MLPs of up to `tokens` tokens (two linears run there)."""
  fused = runtime.gated_mlp

  def gated_mlp(w_gating, w_linear, x, *rest):
    return None if math.prod(x.shape[:-1]) <= tokens else fused(w_gating, w_linear, x, *rest)
  return gated_mlp


# The library's, taken before any flag patches them (`gatedint4` turns the threshold off).
_GATED_TILES, _LONG_PREFIX_TOKENS = mosaic_gpu.gated_tiles, gated.UNPACKED_MIN_TOKENS


def _gated_tiles_ws(m, f, k, w_bits=4):
  """`mosaic_gpu.gated_tiles` with the warp-specialised kernel (two MMA warpgroups of 64 gate
  and 64 up rows, 128-token tiles, 4 stages) for the long prefixes (the library's
  `gated.UNPACKED_MIN_TOKENS`: the prefix at batch 8)."""
  if m >= _LONG_PREFIX_TOKENS:
    return mosaic_gpu.MosaicTiles(tile_n=64, tile_m=128, stages=4, compute_wgs=2)
  return _GATED_TILES(m, f, k, w_bits)


def _int8_too(table):
  """A dispatch table whose Mosaic rules take int8 codes wherever they take int4 codes of the
  same shape."""
  def widened(rule):
    when = lambda p, real=rule.when: real(  # noqa: E731
        dataclasses.replace(p, codes=jnp.int4) if p.codes == jnp.int8 else p)
    return dataclasses.replace(rule, when=when) if rule.implementation == "mosaic" else rule
  return tuple(widened(r) for r in table)


def _int8_mosaic_tables():
  """(w4a8.TABLES, w4a8.IN_PLACE_TABLES, gated.TABLES) with auto-dispatch's Mosaic rules taking
  int8 codes too (W8A8 layers, e.g. an expert MLP at W8, on the Mosaic kernels where int4 codes
  of the same shape would run there; the library keeps them on XLA's int8 GEMM)."""
  auto = lambda tables, keys: {**tables, **{k: _int8_too(tables[k]) for k in keys}}  # noqa: E731
  return (auto(w4a8.TABLES, [None]), auto(w4a8.IN_PLACE_TABLES, [None]),
          auto(gated.TABLES, [(None, False), (None, True)]))


@contextlib.contextmanager
def dispatch_overrides(share):
  """The variant's dispatch overrides around its compilation: `unfused` (Gemma MLPs as two
  linears, `runtime.gated_mlp` declining), `flowunfused` (the same up to `FLOW_TOKENS` tokens),
  `kernelprefix` (long prefixes on the Mosaic kernel, never the unpacked int8 GEMM,
  `kernels.w4a8.UNPACKED_MIN_TOKENS`), `wopallas` (`WEIGHT_ONLY_PALLAS` as
  `kernels.weight_only.AUTO`), `tiles128` (the Mosaic kernels' 128-token tiles from 257 tokens,
  `mosaic_gpu.TILE64_MAX_TOKENS` off), `gatedint4` (gated MLPs of long prefixes on the int4
  codes, no per-call int8 copy, `gated.UNPACKED_MIN_TOKENS` off), `gatedws` (gated MLPs of long
  prefixes on the warp-specialised kernel, `_gated_tiles_ws`; with `gatedint4`, on the int4
  codes), `int8mosaic` (int8 weight codes on the Mosaic kernels where auto-dispatch runs int4
  codes there, `_int8_mosaic_tables`)."""
  int8 = "int8mosaic" in share
  mm_tables, mm_in_place, gated_tables = _int8_mosaic_tables() if int8 else (None, None, None)
  declining = (lambda *a: None) if "unfused" in share else _gated_mlp_above(FLOW_TOKENS)
  with _patched_attr(runtime, "gated_mlp", declining,
                     "unfused" in share or "flowunfused" in share), \
      _patched_attr(w4a8, "UNPACKED_MIN_TOKENS", 2**62, "kernelprefix" in share), \
      _patched_attr(weight_only, "AUTO", WEIGHT_ONLY_PALLAS, "wopallas" in share), \
      _patched_attr(mosaic_gpu, "TILE64_MAX_TOKENS", 256, "tiles128" in share), \
      _patched_attr(mosaic_gpu, "gated_tiles", _gated_tiles_ws, "gatedws" in share), \
      _patched_attr(gated, "UNPACKED_MIN_TOKENS", 2**62, "gatedint4" in share), \
      _patched_attr(w4a8, "TABLES", mm_tables, int8), \
      _patched_attr(w4a8, "IN_PLACE_TABLES", mm_in_place, int8), \
      _patched_attr(gated, "TABLES", gated_tables, int8), \
      bound_linears():
    yield


def _variants_of(args, variants, packed, bound):
  """(matmul, transform label, share flags, Execution fields, packed tree) of each dispatch
  variant of one pack, and with `bound` the floors of --bound."""
  out = []
  bounds = [("free", "free"), ("gemm-only", "none")] if args.bound and bound else []
  for matmul, transform, *share in variants + bounds:
    execution = {}
    if matmul == "free":
      packed_v = free_linears(packed)
    elif matmul == "gemm-only":
      packed_v = gemm_only_linears(packed)
    else:
      packed_v = packed
      execution.update(matmul=_auto_none(matmul), transform=_auto_none(transform))
    if "noshare" in share:
      packed_v = unshared_inputs(packed_v)
      transform = f"{transform}/noshare"
    for flag, name in ((True, "inplace"), (False, "sliced")):
      if name in share:  # stacked layer weights read in place or sliced (Execution.stacked_in_place)
        execution["stacked_in_place"] = flag
        transform = f"{transform}/{name}"
    for name in DISPATCH_FLAGS:
      if name in share:
        transform = f"{transform}/{name}"
    out.append((matmul, transform, share, execution, packed_v))
  return out


def _time_setting(args, variants, policy, params, packs, obs, xla, openpi):
  """Rows for one model x batch x unroll x attention x XLA options setting: each pack's dispatch
  variants against the float policy (and, with `openpi` = (compiled, compile s) of openpi's own
  form, against that), all compiled first, then timed interleaved (`time_interleaved`) in this
  process."""
  model, b = policy.cfg.name, obs.state.shape[0]
  steps = (10, 1) if args.breakdown else (10,)
  entries = {}  # key -> (compiled, params, compile s)
  for n in steps:
    entries["bf16", n] = (*compile_policy(policy, params, obs, n, xla), params)
  if openpi is not None:
    entries["openpi", 10] = (*openpi, params)
  runs = []
  for i, (cfg, packed, s, pack_s) in enumerate(packs):
    for v, (matmul, transform, share, execution, packed_v) in enumerate(
        _variants_of(args, variants, packed, bound=i == 0)):
      policy_v = Policy(policy.cfg, PackedRuntime(Execution(**execution)))
      try:
        with dispatch_overrides(share):
          compiled = {n: compile_policy(policy_v, packed_v, obs, n, xla) for n in steps}
      except Exception as e:  # one variant's kernel failing to build must not lose the others
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"# {model} batch {b} {cfg.name} {matmul}/{transform}: not timed, compiling "
              f"failed: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
        continue
      for n in steps:
        entries[(i, v), n] = (*compiled[n], packed_v)
      runs.append(((i, v), cfg, packed, s, pack_s, matmul, transform))
  keys = list(entries)
  timed = dict(zip(keys, time_interleaved([(entries[k][0], entries[k][2]) for k in keys], obs,
                                          args.repeats, args.rounds)))
  (l_fp, spread_fp), c_fp = timed["bf16", 10], entries["bf16", 10][1]
  rows = []
  for key, cfg, packed, s, pack_s, matmul, transform in runs:
    (l_q, spread_q), c_q = timed[key, 10], entries[key, 10][1]
    row = dict(model=model, batch=b, preset=cfg.name, all_linears=args.all_linears,
               matmul=matmul, transform=transform, permutation=args.permutation,
               unroll="on" if policy.cfg.unroll_layers else "off",
               attention=policy.cfg.attention, xla=xla, rounds=args.rounds,
               latency_bf16_ms=l_fp, latency_packed_ms=l_q, speedup=l_fp / l_q,
               spread_bf16_ms=spread_fp, spread_packed_ms=spread_q,
               compile_bf16_s=c_fp, compile_packed_s=c_q, pack_s=pack_s,
               weights_bf16_gib=tree_bytes(params) / 2**30,
               weights_packed_gib=tree_bytes(packed) / 2**30,
               quantized_layers_ratio=s.weight_bytes_packed / max(s.weight_bytes_fp, 1),
               latency_openpi_ms=None, speedup_vs_openpi=None)
    if openpi is not None:
      l_op = timed["openpi", 10][0]
      row.update(latency_openpi_ms=l_op, speedup_vs_openpi=l_op / l_q)
    if args.breakdown:
      for name, k in (("bf16", "bf16"), ("packed", key)):
        l10, l1 = timed[k, 10][0], timed[k, 1][0]
        step = (l10 - l1) / 9
        row[f"step_{name}_ms"], row[f"prefix_{name}_ms"] = step, l1 - step
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default="pi0,pi05")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--size", default="full")
  ap.add_argument("--preset", default="recommended",
                  help="comma list of presets or scripts/deploy_candidates.py keys, each packed "
                       "and timed against the same bf16 timing")
  ap.add_argument("--all-linears", action="store_true")
  ap.add_argument("--repeats", type=int, default=10,
                  help="timed calls of each entry per round")
  ap.add_argument("--rounds", type=int, default=3,
                  help="rounds of timing: each round times every entry of a setting (bf16, "
                       "openpi's form, each variant) in turn; a row's latency is the median of "
                       "all its calls, its spread the range of its round medians")
  ap.add_argument("--json", default=None)
  ap.add_argument("--variants", default="auto/auto",
                  help=f"comma list of MATMUL/TRANSFORM[/noshare][/inplace|/sliced]{_FLAG_SYNTAX} "
                       "dispatch choices for the packed policy (kernels.IMPLEMENTATIONS / "
                       "kernels.TRANSFORM_IMPLEMENTATIONS, or auto for the library's choice; "
                       "noshare: every linear quantizes its input alone; inplace / sliced: "
                       "Execution(stacked_in_place=True / False), stacked layer weights read in "
                       "place at a layer index (the default) or sliced per layer; unfused: Gemma "
                       "MLPs as two linears, not the fused gated_mlp; flowunfused: the same for "
                       f"MLPs of up to {FLOW_TOKENS} tokens (the flow steps at batch 1); "
                       "kernelprefix: long prefixes "
                       "on the Mosaic kernel, not the unpacked int8 GEMM; wopallas: weight-only "
                       f"matmuls of up to {FLOW_TOKENS} tokens on the Pallas kernel, reading "
                       "stacked weights in place; tiles128: the Mosaic kernels' 128-token tiles from 257 "
                       "tokens (the library: 64 up to 512); gatedint4: gated MLPs of long "
                       "prefixes on the int4 codes (the library: on a per-call int8 copy); gatedws: "
                       "the same on the warp-specialised gated kernel; int8mosaic: int8 weight "
                       "codes on the Mosaic kernels where int4 codes would run there), "
                       "e.g. auto/auto,auto/auto/sliced,auto/auto/unfused")
  ap.add_argument("--permutation", default=None, help="override the rules' permutation (e.g. none)")
  ap.add_argument("--unroll", default="off",
                  help="comma list of off,on: layer scans as while loops (openpi) or unrolled; both "
                       "bf16 and packed are timed under each (same params)")
  ap.add_argument("--attention", default="einsum",
                  help=f"comma list of {','.join(ATTENTIONS)} (Pi0Config.attention): openpi's "
                       "einsum attention, jax.nn.dot_product_attention through XLA or cuDNN "
                       "flash attention (cudnn: NVIDIA GPU, bf16), or the Pallas kernel "
                       "(models.attention_kernel); both bf16 and packed are timed under each (same "
                       "params)")
  ap.add_argument("--xla", default="default",
                  help=f"comma list of XLA compiler option sets ({','.join(XLA_OPTIONS)}; "
                       "XLA_OPTIONS): both bf16 and packed are compiled with each")
  ap.add_argument("--openpi-baseline", action="store_true",
                  help="also time openpi's own form (bf16, scanned layers, einsum attention, "
                       "default XLA options; compiled once per model and batch, timed "
                       "interleaved with every setting), and give every packed row's speedup "
                       "against it (the speed issue's target ratio)")
  ap.add_argument("--bound", action="store_true",
                  help="also time the packed tree with every packed linear made free (FreeLinear): "
                       "the floor any quantization of those layers could reach; and with only the "
                       "activation side made free (GemmOnlyLinear: no transform, int8 by a cast): "
                       "the floor of fusing transforms and quantizers into these matmuls (first preset only)")
  ap.add_argument("--no-clip-search", action="store_true",
                  help="speed only: pack without the weight clip search and with round-to-nearest "
                       "in place of GPTQ (the same program and bytes with other codes; "
                       "full-size packing takes ~90 s with the search)")
  ap.add_argument("--breakdown", action="store_true",
                  help="also time 1-step calls: prefix ~ t(1) - step, step = (t(10) - t(1)) / 9")
  args = ap.parse_args()
  variants = [tuple(v.split("/")) for v in args.variants.split(",")]
  mm_ok = ["auto"] + [i for i in kernels.IMPLEMENTATIONS if i]
  tr_ok = ["auto"] + [i for i in kernels.TRANSFORM_IMPLEMENTATIONS if i]
  if any(len(v) < 2 or v[0] not in mm_ok or v[1] not in tr_ok
         or not set(v[2:]) <= {"noshare", "inplace", "sliced", *DISPATCH_FLAGS}
         for v in variants):
    ap.error(f"--variants must be MATMUL/TRANSFORM[/noshare][/inplace|/sliced]{_FLAG_SYNTAX} "
             f"({'|'.join(mm_ok)} / {'|'.join(tr_ok)}), "
             f"got {args.variants!r}")
  attentions = args.attention.split(",")
  if not set(attentions) <= set(ATTENTIONS):
    ap.error(f"--attention takes a comma list of {','.join(ATTENTIONS)}, got {args.attention!r}")
  xlas = args.xla.split(",")
  if not set(xlas) <= set(XLA_OPTIONS):
    ap.error(f"--xla takes a comma list of {','.join(XLA_OPTIONS)}, got {args.xla!r}")
  rows = []
  for model in args.models.split(","):
    policy = get_policy(model, args.size)
    params = jax.block_until_ready(random_params(policy))
    stats = synthetic_stats(params)
    packs = []
    for preset in args.preset.split(","):
      cfg = bench_config(preset, args.all_linears)
      if args.no_clip_search:
        cfg = speed_only(cfg)
      if args.permutation is not None:
        cfg = dataclasses.replace(cfg, rules=tuple(
            dataclasses.replace(r, permutation=args.permutation) for r in cfg.rules))
      t = time.perf_counter()
      packed = _repack_activations(packs, cfg)
      if packed is None:
        packed = jax.block_until_ready(quantize_params(params, cfg, stats))
      packs.append((cfg, packed, summarize(packed), time.perf_counter() - t))
    del stats
    for b in (int(v) for v in args.batches.split(",")):
      obs = make_observation(policy.cfg, jax.random.key(1), b)
      # openpi's own form: scanned layers, einsum attention, bf16, default XLA options
      openpi = (compile_policy(_configured(policy, "off", "einsum"), params, obs)
                if args.openpi_baseline else None)
      for unroll in args.unroll.split(","):
        for attention in attentions:
          policy_u = _configured(policy, unroll, attention)
          for xla in xlas:
            rows += _time_setting(args, variants, policy_u, params, packs, obs, xla, openpi)

  print(f"\ndevice={jax.devices()[0].device_kind} jax={jax.__version__}")
  print("| model | batch | unroll | attention | xla | preset | matmul / transform | bf16 ms | packed ms | speedup | spread bf16 / packed ms | compile bf16 / packed s | weights bf16 / packed GiB | all-weights ratio | quantized-layers ratio |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['batch']} | {r['unroll']} | {r['attention']} | {r['xla']} | {r['preset']} | {r['matmul']} / {r['transform']} | {r['latency_bf16_ms']:.1f} | {r['latency_packed_ms']:.1f} | "
          f"{r['speedup']:.2f}x | {r['spread_bf16_ms']:.1f} / {r['spread_packed_ms']:.1f} | "
          f"{r['compile_bf16_s']:.0f} / {r['compile_packed_s']:.0f} | "
          f"{r['weights_bf16_gib']:.2f} / {r['weights_packed_gib']:.2f} | "
          f"{r['weights_packed_gib'] / r['weights_bf16_gib']:.3f} | {r['quantized_layers_ratio']:.3f} |")
  if args.openpi_baseline:
    print("\n| model | batch | unroll | attention | xla | preset | openpi bf16 ms | packed ms | "
          "speedup vs openpi |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['model']} | {r['batch']} | {r['unroll']} | {r['attention']} | {r['xla']} | "
            f"{r['preset']} | {r['latency_openpi_ms']:.1f} | {r['latency_packed_ms']:.1f} | "
            f"{r['speedup_vs_openpi']:.2f}x |")
  if args.breakdown:
    print("\n| model | batch | preset | matmul / transform | prefix bf16 / packed ms | one step bf16 / packed ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['model']} | {r['batch']} | {r['preset']} | {r['matmul']} / {r['transform']} | {r['prefix_bf16_ms']:.1f} / {r['prefix_packed_ms']:.1f} | "
            f"{r['step_bf16_ms']:.2f} / {r['step_packed_ms']:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
