"""Conversion of a full-size openpi checkpoint on a CPU: time and peak memory (BENCHMARKS.md).

Usage:
  PYTHONPATH=. python scripts/bench_convert.py make /tmp/pi0_full_bf16 [--model pi0] [--as-state]
  PYTHONPATH=. /usr/bin/time -v python scripts/bench_convert.py convert /tmp/pi0_full_bf16 \
      /tmp/pi0_full_w4a8 [--preset recommended] [--rounding nearest|gptq] [--all-linears] \
      [--overwrite]

`make` writes random bf16 params of the full-size model the way openpi saves them (an orbax
PyTree checkpoint at DIR/params holding {"params": tree}, ocdbt), one stacked layer at a time so
that only the bf16 tree is ever in memory: Gemma linears ~ N(0, 1/fan_in), every other leaf
~ N(0, 0.02^2) (random, so the files are as large as a real checkpoint's).

`convert` runs `duquant_jax.openpi_checkpoint.convert_checkpoint` (the streamed conversion that
`duquant-jax convert` runs when it does not calibrate) with synthetic calibration stats
(`duquant_jax.lab.synthetic_stats`; a full-size forward pass for real calibration does not fit this
benchmark's CPU budget), and prints the time of each phase. `--all-linears` applies the preset's
first rule to all 126 + 126 Gemma linears, as `scripts/bench_pack.py --all-linears` does;
`--rounding` sets every rule's rounding, as `duquant-jax convert --rounding` does (`recommended`
rounds with GPTQ: tens of minutes at full size on a CPU, BENCHMARKS.md).
These random weights measure cost only, never accuracy.
"""

import argparse
import dataclasses
import pathlib
import shutil
import sys
import time

import numpy as np

from duquant_jax.openpi_paths import EXPERTS, pattern

# Every Gemma linear of both experts.
ALL_GEMMA = pattern(("q", "kv", "attn_vec", "gating", "linear"), EXPERTS)


def make(dst: str, model: str, as_state: bool, seed: int = 0) -> None:
  import jax
  import ml_dtypes
  from duquant_jax.layouts import linear_layouts
  from duquant_jax.models import get_policy
  from duquant_jax.treepath import path_str
  from duquant_jax.openpi_checkpoint import save_openpi_params
  shapes = get_policy(model, "full").param_shapes()
  layouts = linear_layouts(shapes)
  rng = np.random.default_rng(seed)
  t = time.perf_counter()

  def leaf(kp, s):
    path = path_str(kp)
    std = layouts[path].in_features ** -0.5 if path in layouts else 0.02
    out = np.empty(s.shape, ml_dtypes.bfloat16)
    rows = out.reshape(-1, s.shape[-1]) if len(s.shape) > 1 else out.reshape(1, -1)
    step = max(1, (1 << 26) // rows.shape[1])  # ~256 MB of float32 at a time
    for i in range(0, rows.shape[0], step):
      chunk = rng.standard_normal((min(step, rows.shape[0] - i), rows.shape[1]), np.float32)
      rows[i:i + step] = (chunk * std).astype(ml_dtypes.bfloat16)
    return out

  params = jax.tree_util.tree_map_with_path(leaf, shapes)
  t_gen = time.perf_counter() - t
  t = time.perf_counter()
  save_openpi_params(dst, params, force=True, as_state=as_state)
  print(f"wrote {model} full bf16 random params to {dst}/params: generate {t_gen:.1f} s, "
        f"save {time.perf_counter() - t:.1f} s, "
        f"{sum(p.stat().st_size for p in pathlib.Path(dst).rglob('*') if p.is_file()) / 2**30:.2f} "
        "GiB on disk")


def convert(src: str, dst: str, preset: str, all_linears: bool, overwrite: bool,
            rounding: str | None = None) -> None:
  import jax
  from duquant_jax.config import get_preset
  from duquant_jax.openpi_checkpoint import convert_checkpoint, open_openpi
  from duquant_jax.lab.synthetic_stats import synthetic_stats
  t0 = time.perf_counter()
  cfg = get_preset(preset)
  if all_linears:
    cfg = dataclasses.replace(cfg, rules=(dataclasses.replace(cfg.rules[0], pattern=ALL_GEMMA),))
  if rounding is not None:
    cfg = dataclasses.replace(cfg, rules=tuple(dataclasses.replace(r, rounding=rounding)
                                               for r in cfg.rules))
  info = open_openpi(src)
  t_open = time.perf_counter() - t0
  t = time.perf_counter()
  select = ALL_GEMMA if all_linears else None
  stats = jax.block_until_ready(synthetic_stats(info.shapes, select))
  t_stats = time.perf_counter() - t
  t = time.perf_counter()
  phases, peak = {}, _PeakRss()
  out = convert_checkpoint(src, dst, cfg, stats, overwrite=overwrite, save_stats=False,
                           progress=sys.stderr.isatty(), timings=phases)
  t_conv = time.perf_counter() - t
  peak.stop()
  size = sum(p.stat().st_size for p in pathlib.Path(out).rglob("*") if p.is_file())
  roundings = ",".join(sorted({r.rounding for r in cfg.rules}))
  print(f"{info.model} {info.size} preset={cfg.name} rounding={roundings} "
        f"all_linears={all_linears} backend={jax.default_backend()} jax={jax.__version__}")
  print(f"open {t_open:.1f} s; synthetic stats {t_stats:.1f} s; convert_checkpoint {t_conv:.1f} s; "
        f"total {time.perf_counter() - t0:.1f} s; wrote {size / 2**30:.2f} GiB to {out}")
  print("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
        + f"; peak RSS {peak.peak / 2**30:.2f} GiB, {peak.when:.0f} s into convert_checkpoint")


class _PeakRss:
  """Samples this process's resident memory every 50 ms in a thread: the peak and when it was."""

  def __init__(self):
    import threading
    self.peak, self.when, self._t0, self._stop = 0, 0.0, time.perf_counter(), threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    import os
    page = os.sysconf("SC_PAGE_SIZE")
    while not self._stop.wait(0.05):
      with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * page
      if rss > self.peak:
        self.peak, self.when = rss, time.perf_counter() - self._t0

  def stop(self):
    self._stop.set()
    self._thread.join()


def main():
  ap = argparse.ArgumentParser()
  sub = ap.add_subparsers(dest="cmd", required=True)
  m = sub.add_parser("make")
  m.add_argument("dst")
  m.add_argument("--model", default="pi0")
  m.add_argument("--as-state", action="store_true", help="nnx.State leaves (training checkpoint)")
  c = sub.add_parser("convert")
  c.add_argument("src")
  c.add_argument("dst")
  c.add_argument("--preset", default="recommended")
  c.add_argument("--all-linears", action="store_true")
  c.add_argument("--rounding", choices=("nearest", "gptq"), help="every rule's rounding")
  c.add_argument("--overwrite", action="store_true")
  c.add_argument("--remove-output", action="store_true", help="delete DST afterwards")
  args = ap.parse_args()
  if args.cmd == "make":
    make(args.dst, args.model, args.as_state)
  else:
    convert(args.src, args.dst, args.preset, args.all_linears, args.overwrite, args.rounding)
    if args.remove_output:
      shutil.rmtree(args.dst)


if __name__ == "__main__":
  main()
