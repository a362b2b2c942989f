"""Measures calibration of the demo model: time for N batches, and memory for a small vs a large G.

  PYTHONPATH=. python scripts/calibrate_demo.py                       # time 128 batches of 4
  PYTHONPATH=. python scripts/calibrate_demo.py --memory 32 512      # peak RSS, one subprocess each
  PYTHONPATH=. python scripts/calibrate_demo.py --compare-sampling   # 'first' vs 'spread' stats

The memory runs feed `calibrate` G batches as a zero-copy numpy view of one batch group
(`np.broadcast_to`), so the input itself costs no memory and the peak RSS shows calibrate's own
footprint; the jitted chunk program (and its compiled temp memory) is the same for every G.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import jax
import numpy as np

from duquant_jax import calib_data, calibrate as cal, stats as st
from duquant_jax.models import get_policy
from duquant_jax.lab.synthetic import realistic_params
from duquant_jax.openpi_paths import site


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timing(args, policy, params) -> dict:
  t0 = time.perf_counter()
  batches = calib_data.calibration_batches(policy, params, jax.random.key(1), num_batches=args.num_batches,
                                           batch_size=args.batch_size, sampling=args.sampling)
  t_data = time.perf_counter() - t0
  cfg = cal.CalibConfig(chunk_size=args.chunk_size, per_step=True, progress=not args.quiet)
  t0 = time.perf_counter()
  stats = cal.calibrate(policy, params, batches, cfg, rng=jax.random.key(2))
  t_cal = time.perf_counter() - t0
  # Steady state: the same program again (compiled now).
  t0 = time.perf_counter()
  cal.calibrate(policy, params, batches, cfg, rng=jax.random.key(3))
  t_warm = time.perf_counter() - t0
  q = stats[site("linear").path()]
  return {"num_batches": args.num_batches, "batch_size": args.batch_size, "sampling": args.sampling,
          "data_seconds": round(t_data, 2), "calibrate_seconds": round(t_cal, 2),
          "calibrate_seconds_warm": round(t_warm, 2),
          "batches_per_second_warm": round(args.num_batches / t_warm, 1),
          "linears": len(stats), "example_p999_over_absmax_mlp_linear":
              float(np.median(np.asarray(st.percentile(q, 99.9)) / np.asarray(q.absmax)))}


def _memory_one(args, policy, params, groups: int) -> dict:
  one = policy.example_observation(jax.random.key(0), args.batch_size)
  batches = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x)[None], (groups,) + x.shape), one)
  cfg = cal.CalibConfig(chunk_size=args.chunk_size, per_step=True, progress=False)
  before = _rss_mb()
  t0 = time.perf_counter()
  stats = cal.calibrate(policy, params, batches, cfg, rng=jax.random.key(2))
  seconds = time.perf_counter() - t0
  stats_mb = sum(x.nbytes for x in jax.tree.leaves(stats)) / 2**20
  return {"groups": groups, "peak_rss_mb_before": round(before, 1), "peak_rss_mb": round(_rss_mb(), 1),
          "stats_mb": round(stats_mb, 1), "seconds": round(seconds, 1),
          "count_expert_mlp": int(stats[site("linear").path("_1")].count)}


def _compare_sampling(args, policy, params) -> dict:
  out = {}
  for sampling in calib_data.SAMPLINGS:
    batches = calib_data.calibration_batches(policy, params, jax.random.key(1), num_batches=32,
                                             batch_size=args.batch_size, sampling=sampling,
                                             num_chunks=32, num_episodes=16)
    stats = cal.calibrate(policy, params, batches, cal.CalibConfig(progress=False),
                          rng=jax.random.key(2))
    out[sampling] = {p: np.asarray(st.percentile(s, 99.9)) for p, s in stats.items()}
  ratios = {p: float(np.median(out["spread"][p] / np.maximum(out["first"][p], 1e-9)))
            for p in out["spread"]}
  return {"median_p999_ratio_spread_over_first": ratios}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="pi0", choices=("pi0", "pi05"))
  ap.add_argument("--num-batches", type=int, default=128)
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--chunk-size", type=int, default=16)
  ap.add_argument("--sampling", default="spread", choices=calib_data.SAMPLINGS)
  ap.add_argument("--memory", type=int, nargs="*", help="measure peak RSS for these G (subprocesses)")
  ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
  ap.add_argument("--compare-sampling", action="store_true")
  ap.add_argument("--quiet", action="store_true")
  args = ap.parse_args(argv)

  if args.memory:
    rows = []
    for g in args.memory:
      cmd = [sys.executable, __file__, "--model", args.model, "--batch-size", str(args.batch_size),
             "--chunk-size", str(args.chunk_size), "--memory-child", str(g)]
      rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True)
                             .stdout.strip().splitlines()[-1]))
      print(json.dumps(rows[-1]))
    return

  policy = get_policy(args.model, "demo")
  t0 = time.perf_counter()
  params = realistic_params(policy, 0)
  if not args.memory_child:
    print(f"# realistic demo params: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
  if args.memory_child:
    print(json.dumps(_memory_one(args, policy, params, args.memory_child)))
  elif args.compare_sampling:
    print(json.dumps(_compare_sampling(args, policy, params), indent=1))
  else:
    print(json.dumps(_timing(args, policy, params), indent=1))


if __name__ == "__main__":
  main()
