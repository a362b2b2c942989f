"""Where does `sample_actions` spend its time? A device trace of bf16 vs packed, summed per op.

Traces `--calls` calls of the jitted full-size policy (random weights, synthetic stats, as
bench_policy.py) with `jax.profiler`, reads the trace back with `jax.profiler.ProfileData`, and prints
per call: wall time, summed GPU kernel time, kernel count, and the ops with the most GPU time
(grouped by the HLO op name XLA gives the kernel, with digits stripped so that `fusion.12` and
`fusion.57` group together; pass --no-group to keep them apart). `--by-op N` also lists the N
single HLO ops with the most GPU time, with their result shapes from the compiled HLO, which says
which layer a fusion belongs to.

Usage (GPU): cd scripts && PYTHONPATH=.. python profile_policy.py [--model pi0] [--batch 1,8] [--top 25]
             [--preset deploy] [--matmuls auto,xla] [--transform auto] [--no-bf16] [--by-op 40]
             [--unroll] [--attention cudnn]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import tempfile
import time

import jax
import numpy as np

from duquant_jax.models import ATTENTIONS, Policy, get_policy, make_observation
from duquant_jax.quantize import quantize_params
from duquant_jax.lab.synthetic_stats import synthetic_stats
from duquant_jax.runtime import Execution, PackedRuntime

from bench_pack import bench_config, random_params, speed_only


def device_events(path):
  """[(line name, event name, duration ns)] of every event on the GPU planes of a trace file."""
  from jax.profiler import ProfileData
  out = []
  for plane in ProfileData.from_file(path).planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      for ev in line.events:
        out.append((line.name, ev.name, ev.duration_ns))
  return out


def profile(fn, args, calls):
  jax.block_until_ready(fn(*args))  # warm up (and compile, for a jitted fn)
  d = tempfile.mkdtemp()
  t = time.perf_counter()
  with jax.profiler.trace(d):
    for _ in range(calls):
      jax.block_until_ready(fn(*args))
  wall = (time.perf_counter() - t) / calls
  [path] = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
  return wall, device_events(path)


def hlo_result_types(compiled_text):
  """{HLO instruction name: 'operand types -> result type'} from compiled HLO text.

  For a fusion the operand types are those of its fused computation's parameters; for any other
  instruction only the result type is known."""
  sigs = {m.group(1): m.group(2) for m in re.finditer(
      r"^%?([\w.\-]+) \((.*)\) -> .* \{$", compiled_text, re.M)}
  types = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\S+) (.*)$", compiled_text, re.M):
    called = re.search(r"calls=%?([\w.\-]+)", m.group(3))
    params = ""
    if called and called.group(1) in sigs:
      params = ", ".join(re.sub(r"^[\w.\-]+: ", "", p.strip())
                         for p in sigs[called.group(1)].split(", ")) + " -> "
    types.setdefault(m.group(1), params + re.sub(r"\{[^}]*\}", "", m.group(2)))
  return types


def tally(pairs):
  """{key: [launches, total duration]} of (key, duration) pairs, largest total first."""
  per = collections.defaultdict(lambda: [0, 0.0])
  for key, dur in pairs:
    per[key][0] += 1
    per[key][1] += dur
  return dict(sorted(per.items(), key=lambda kv: -kv[1][1]))


def top_ops(events, calls, n, types):
  """The n single ops with the most GPU time: [(name, result type, count/call, ms/call)]."""
  per = tally([(n, d) for l, n, d in events if l == "XLA Ops"] or [
      (n, d) for l, n, d in events if l.startswith("Stream")])
  # Kernel names spell the HLO name's `.N` suffix as `_N`.
  hlo_type = lambda k: types.get(k) or types.get(re.sub(r"_(\d+)$", r".\1", k), "?")
  rows = [(k, hlo_type(k), c / calls, ns / calls / 1e6) for k, (c, ns) in list(per.items())[:n]]
  print("  | single op | result | count/call | ms/call |")
  for k, t, c, ms in rows:
    print(f"  | {k[:60]} | {t[:160]} | {c:.0f} | {ms:.3f} |")
  return rows


def duration_buckets(events, calls, name):
  """Launches of the kernels named `name` (on the GPU streams) by duration, in buckets of 2x
  width: [(low us, high us, launches per call, ms per call)]. Separates call sites that share
  one kernel name (every Mosaic GPU kernel is `body_mosaic_gpu_kernel` in the trace)."""
  per = tally((2.0 ** np.floor(np.log2(d / 1e3)), d) for line, n, d in events
              if line.startswith("Stream") and n == name and d > 0)
  rows = [(low, 2 * low, c / calls, ns / calls / 1e6) for low, (c, ns) in sorted(per.items())]
  if rows:
    print(f"  {name} by duration:")
    print("  | us | launches/call | ms/call |")
    for low, high, c, ms in rows:
      print(f"  | {low:g}-{high:g} | {c:.0f} | {ms:.3f} |")
  return rows


def summarize(wall, events, calls, top, group):
  lines = collections.Counter(l for l, _, _ in events)
  kernels = [(n, d) for l, n, d in events if l.startswith("Stream")]
  ops = [(n, d) for l, n, d in events if l == "XLA Ops"] or kernels
  per = tally((re.sub(r"[.\d]+$", "", name) if group else name, dur) for name, dur in ops)
  busy = sum(d for _, d in kernels) / calls / 1e6
  res = dict(wall_ms=1e3 * wall, gpu_kernel_ms=busy, kernels_per_call=len(kernels) / calls,
             lines=dict(lines),
             top=[(k, c / calls, ns / calls / 1e6) for k, (c, ns) in list(per.items())[:top]])
  print(f"  wall {res['wall_ms']:.1f} ms/call, GPU kernels {busy:.1f} ms/call, "
        f"{res['kernels_per_call']:.0f} kernels/call; trace lines {dict(lines)}")
  print("  | op | count/call | ms/call |")
  for k, c, ms in res["top"]:
    print(f"  | {k[:90]} | {c:.0f} | {ms:.3f} |")
  return res


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="pi0")
  ap.add_argument("--size", default="full")
  ap.add_argument("--batch", default="1", help="batch size, or a comma list (one pack for all)")
  ap.add_argument("--preset", default="recommended")
  ap.add_argument("--calls", type=int, default=3)
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--no-group", action="store_true")
  ap.add_argument("--matmuls", default="auto",
                  help="comma list of W4A8 matmul implementations to profile the packed tree with "
                       "(kernels.IMPLEMENTATIONS names, or auto)")
  ap.add_argument("--transform", default="auto",
                  help="online transform implementation of the packed trees "
                       "(kernels.TRANSFORM_IMPLEMENTATIONS names, or auto)")
  ap.add_argument("--by-op", type=int, default=0,
                  help="also list this many single ops with their result shapes")
  ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 profile")
  ap.add_argument("--buckets", default="body_mosaic_gpu_kernel",
                  help="comma list of kernel names to also list by duration (call sites that "
                       "share a name); empty for none")
  ap.add_argument("--no-clip-search", action="store_true",
                  help="pack without the weight clip search, rounding to nearest in place of GPTQ "
                       "(same program, other codes)")
  ap.add_argument("--unroll", action="store_true",
                  help="unrolled layers (Pi0Config(unroll_layers=True)) for bf16 and packed alike")
  ap.add_argument("--attention", default="einsum", choices=ATTENTIONS,
                  help="Pi0Config.attention for bf16 and packed alike: openpi's einsum attention, "
                       "jax.nn.dot_product_attention through XLA or cuDNN flash attention, or the "
                       "Pallas kernel (models.attention_kernel) "
                       "(cudnn: NVIDIA GPU, bf16)")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  policy = get_policy(args.model, args.size, unroll_layers=args.unroll, attention=args.attention)
  params = jax.block_until_ready(random_params(policy))
  cfg = bench_config(args.preset, False)
  if args.no_clip_search:
    cfg = speed_only(cfg)
  packed = jax.block_until_ready(quantize_params(params, cfg, synthetic_stats(params)))
  out = {}
  trees = [] if args.no_bf16 else [("bf16", jax.jit(policy.sample_actions), params)]
  for mm in args.matmuls.split(","):
    execution = Execution(matmul=None if mm == "auto" else mm,
                          transform=None if args.transform == "auto" else args.transform)
    trees.append((f"packed ({mm} / {args.transform})",
                  jax.jit(Policy(policy.cfg, PackedRuntime(execution)).sample_actions), packed))
  for batch in (int(b) for b in str(args.batch).split(",")):
    obs = make_observation(policy.cfg, jax.random.key(1), batch)
    for name, fn, p in trees:
      print(f"{name}, batch {batch}:", flush=True)
      fargs = (p, obs, jax.random.key(0))
      compiled = fn.lower(*fargs).compile()  # profiled, and read for --by-op's shapes
      wall, events = profile(compiled, fargs, args.calls)
      key = f"{name}, batch {batch}"
      out[key] = summarize(wall, events, args.calls, args.top, not args.no_group)
      out[key]["buckets"] = {name: duration_buckets(events, args.calls, name)
                             for name in filter(None, args.buckets.split(","))}
      if args.by_op:
        types = hlo_result_types(compiled.as_text())
        out[key]["top_ops"] = top_ops(events, args.calls, args.by_op, types)
  print(f"\ndevice={jax.devices()[0].device_kind} jax={jax.__version__}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1, default=lambda o: np.asarray(o).tolist())


if __name__ == "__main__":
  main()
