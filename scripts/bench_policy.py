"""Full-size pi0 / pi0.5 `sample_actions`, bf16 vs packed W4A8: latency, compile time, weight memory.

Usage (GPU): python scripts/bench_policy.py [--models pi0,pi05] [--batches 1,8] [--size full]
             [--preset recommended] [--all-linears] [--repeats 20]

Random bf16 weights and synthetic stats (this measures speed and memory, not accuracy). Latency is
the median over `repeats` calls of one jitted `sample_actions` (10 flow steps), after compilation.
Weight memory: bytes of every param leaf on the device (int4 counts half a byte), all params and the
quantized layers alone.
"""

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from duquant_jax.models import get_policy, make_observation
from duquant_jax.quantize import quantize_params, summarize
from duquant_jax.synthetic_stats import synthetic_stats

from bench_pack import bench_config, random_params
from duquant_jax.packed import tree_nbytes as tree_bytes


def time_policy(policy, params, obs, repeats):
  fn = jax.jit(policy.sample_actions)
  rng = jax.random.key(0)
  t = time.perf_counter()
  jax.block_until_ready(fn(params, obs, rng))
  compile_s = time.perf_counter() - t
  times = []
  for i in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(params, obs, jax.random.fold_in(rng, i)))
    times.append(time.perf_counter() - t)
  return compile_s, 1e3 * float(np.median(times))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default="pi0,pi05")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--size", default="full")
  ap.add_argument("--preset", default="recommended")
  ap.add_argument("--all-linears", action="store_true")
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--json", default=None)
  ap.add_argument("--matmul", default="auto", choices=("auto", "xla"),
                  help="W4A8 matmul implementation inside the packed policy (auto: kernel where it won)")
  ap.add_argument("--permutation", default=None, help="override the rules' permutation (e.g. none)")
  args = ap.parse_args()
  if args.matmul == "xla":  # benchmark-only override of the dispatch used by PackedLinear
    import duquant_jax.packed as packed_mod
    from duquant_jax.kernels import xla as xla_mod
    packed_mod._int_matmul = lambda *a: xla_mod.w4a8_matmul(*a)
  rows = []
  for model in args.models.split(","):
    policy = get_policy(model, args.size)
    cfg = bench_config(args.preset, args.all_linears)
    if args.permutation is not None:
      cfg = dataclasses.replace(cfg, rules=tuple(
          dataclasses.replace(r, permutation=args.permutation) for r in cfg.rules))
    params = jax.block_until_ready(random_params(policy))
    stats = synthetic_stats(params)
    t = time.perf_counter()
    packed = jax.block_until_ready(quantize_params(params, cfg, stats))
    pack_s = time.perf_counter() - t
    del stats
    s = summarize(packed)
    for b in (int(v) for v in args.batches.split(",")):
      obs = make_observation(policy.cfg, jax.random.key(1), b)
      c_fp, l_fp = time_policy(policy, params, obs, args.repeats)
      c_q, l_q = time_policy(policy, packed, obs, args.repeats)
      row = dict(model=model, batch=b, preset=cfg.name, all_linears=args.all_linears,
                 matmul=args.matmul, permutation=args.permutation,
                 latency_bf16_ms=l_fp, latency_packed_ms=l_q, speedup=l_fp / l_q,
                 compile_bf16_s=c_fp, compile_packed_s=c_q, pack_s=pack_s,
                 weights_bf16_gib=tree_bytes(params) / 2**30,
                 weights_packed_gib=tree_bytes(packed) / 2**30,
                 quantized_layers_ratio=s.weight_bytes_packed / s.weight_bytes_fp)
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(f"\ndevice={jax.devices()[0].device_kind} jax={jax.__version__}")
  print("| model | batch | bf16 ms | packed ms | speedup | compile bf16 / packed s | weights bf16 / packed GiB | all-weights ratio | quantized-layers ratio |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['batch']} | {r['latency_bf16_ms']:.1f} | {r['latency_packed_ms']:.1f} | "
          f"{r['speedup']:.2f}x | {r['compile_bf16_s']:.0f} / {r['compile_packed_s']:.0f} | "
          f"{r['weights_bf16_gib']:.2f} / {r['weights_packed_gib']:.2f} | "
          f"{r['weights_packed_gib'] / r['weights_bf16_gib']:.3f} | {r['quantized_layers_ratio']:.3f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
