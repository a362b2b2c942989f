"""Trace and lower a policy's `sample_actions` for CUDA on any machine (no GPU needed): how long
jax's own part of a compile takes, and which kernels the module holds.

The packed tree is built abstractly (`jax.eval_shape` of `quantize_params` on bf16 param shapes,
round to nearest, no clip search: the program of the preset, no codes), so full-size models lower
in seconds on a CPU. `--hopper` makes dispatch choose as on a Hopper GPU (the Mosaic kernels), as
the GPU machine would at trace time; without it a CPU machine traces its own choices.
`--flags` applies `bench_policy.py`'s dispatch flags (e.g. `int8mosaic`) around the lowering.

Usage: PYTHONPATH=.. python3 lower_policy.py [--model pi0] [--size full] [--preset fast|bf16]
                                             [--batch 1] [--unroll] [--hopper] [--flags F,...]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from bench_pack import abstract_pack, bench_config, bf16_shapes, speed_only  # noqa: E402
from duquant_jax.kernels import dispatch  # noqa: E402
from duquant_jax.models import Policy, get_policy, make_observation  # noqa: E402
from duquant_jax.runtime import PackedRuntime  # noqa: E402
import bench_policy  # noqa: E402

TRITON = "__gpu$xla.gpu.triton"


def lower_for_cuda(model: str, size: str, preset: str, batch: int, unroll: bool,
                   flags: tuple[str, ...] = ()) -> dict:
  """Seconds to trace and to lower `sample_actions` (10 flow steps) for CUDA under
  `bench_policy`'s dispatch `flags`, the module's size, and the kernel custom calls and int8
  dot_generals in its text (a nested jit is emitted once, however often it is called)."""
  policy = get_policy(model, size, unroll_layers=unroll, attention="pallas")
  params = bf16_shapes(policy)
  if preset != "bf16":
    params = abstract_pack(params, speed_only(bench_config(preset, False)))
    policy = Policy(policy.cfg, PackedRuntime())
  obs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                     make_observation(policy.cfg, jax.random.key(1), batch))
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  fn = jax.jit(lambda p, o, r: policy.sample_actions(p, o, r, num_steps=10))
  with bench_policy.dispatch_overrides(flags):
    t0 = time.perf_counter()
    traced = fn.trace(params, obs, rng)
    t1 = time.perf_counter()
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    t2 = time.perf_counter()
  return dict(model=model, size=size, preset=preset, batch=batch, unroll=unroll,
              trace_s=t1 - t0, lower_s=t2 - t1, module_mb=len(text) / 1e6,
              mosaic_kernels=len(re.findall(r"custom_call @mosaic_gpu", text)),
              triton_kernels=text.count(TRITON),
              int8_dots=len(re.findall(r"stablehlo\.dot_general[^\n]*tensor<[0-9x]*xi8>", text)))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="pi0")
  ap.add_argument("--size", default="full")
  ap.add_argument("--preset", default="fast", help="a preset, a deploy_candidates key, or bf16")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--unroll", action="store_true", help="Pi0Config(unroll_layers=True)")
  ap.add_argument("--hopper", action="store_true",
                  help="dispatch as on a Hopper GPU (trace-time device class forced)")
  ap.add_argument("--flags", default="",
                  help=f"comma list of bench_policy.py dispatch flags: "
                       f"{', '.join(bench_policy.DISPATCH_FLAGS)}")
  args = ap.parse_args()
  flags = tuple(filter(None, args.flags.split(",")))
  if unknown := set(flags) - set(bench_policy.DISPATCH_FLAGS):
    ap.error(f"--flags: unknown {', '.join(sorted(unknown))}; known: "
             f"{', '.join(bench_policy.DISPATCH_FLAGS)}")
  if args.hopper:  # a script's edge: the library reads the device class at trace time
    dispatch.platform = lambda: dispatch.HOPPER
  r = lower_for_cuda(args.model, args.size, args.preset, args.batch, args.unroll, flags)
  form = ("unrolled" if r["unroll"] else "scanned") + (" " + ",".join(flags) if flags else "")
  print(f"{r['model']} ({r['size']}) {r['preset']} batch {r['batch']} {form}: trace "
        f"{r['trace_s']:.1f} s, lower for CUDA {r['lower_s']:.1f} s, module "
        f"{r['module_mb']:.1f} MB, custom calls: {r['mosaic_kernels']} Mosaic, "
        f"{r['triton_kernels']} Triton; int8 dot_generals {r['int8_dots']}")
  print(f"host={jax.default_backend()} jax={jax.__version__}")


if __name__ == "__main__":
  main()
