"""Compare presets and rule variants on a demo model (the tables of EVALUATION.md).

Usage: PYTHONPATH=. python scripts/compare_presets.py {pi0,pi05}
"""
import sys
import time

import jax
import numpy as np
from duquant_jax.models import get_policy
from duquant_jax.lab.synthetic import realistic_params
from duquant_jax.calibrate import calibrate, CalibConfig
from duquant_jax.calib_data import calibration_batches
from duquant_jax.config import get_preset, LayerRule, QuantConfig, LLM, EXPERT_MLP
from duquant_jax.quantize import quantize_params, summarize
from duquant_jax.runtime import PackedRuntime
m = sys.argv[1] if len(sys.argv) > 1 else 'pi0'
pol = get_policy(m, 'demo', runtime=PackedRuntime()); params = realistic_params(pol, 0)
batches = calibration_batches(pol, params, jax.random.key(0), num_batches=16, batch_size=2)
# Hessians of every Gemma linear: `recommended` and `fast` round with GPTQ.
stats = calibrate(pol, params, batches, CalibConfig(progress=False, hessian=".*"), rng=jax.random.key(1))
obs = pol.example_observation(jax.random.key(99), 8)
f = jax.jit(pol.sample_actions)
a_fp = f(params, obs, jax.random.key(5))
def run(name, cfg):
  t = time.time()
  pk = quantize_params(params, cfg, stats)
  tp = time.time() - t
  a = f(pk, obs, jax.random.key(5))
  err = np.linalg.norm(np.asarray(a - a_fp).reshape(8, -1), axis=-1) / np.linalg.norm(np.asarray(a_fp).reshape(8, -1), axis=-1)
  s = summarize(pk)
  print(f'{name:34s} pack {tp:5.1f}s err mean {err.mean():.4f} max {err.max():.4f} bytes {s.weight_bytes_packed/s.weight_bytes_fp:.3f}', flush=True)
def rules(**kw):
  return QuantConfig(rules=(LayerRule(pattern=LLM, **kw), LayerRule(pattern=EXPERT_MLP, **kw)))
for name in ['w4a8-rtn', 'w4a8-b16-c32', 'w4a8-b64-c128', 'recommended', 'w4a8-full', 'w4a8-mixed']:
  run(name, get_preset(name))
V = {
 'w4only': dict(act_bits=None),
 'rtn-asym-clip': dict(rotation='none', permutation='none', smooth_alpha=None),
 'smooth-only-asym-clip': dict(rotation='none', permutation='none'),
 'b64-asym-clip-norot2(no perm)': dict(permutation='none'),
 'b32-asym-clip': dict(block_size=32),
 'b16-asym-clip': dict(block_size=16),
 'b64-hadamard': dict(rotation='hadamard'),
 'b64-steps64': dict(rotation_steps=64),
 'b64-alpha0.65': dict(smooth_alpha=0.65),
 'b64-alpha0.35': dict(smooth_alpha=0.35),
 'b64-sym-acts': dict(act_symmetric=True),
 'b64-outrot': dict(output_rotation='restore'),
 'b64-group64': dict(weight_granularity='group', group_size=64),
 'b64-noclip': dict(clip_search=False),
}
for k, kw in V.items():
  run(k, rules(**kw))
