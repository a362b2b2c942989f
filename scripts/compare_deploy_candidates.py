"""The `deploy` candidates measured on the demo (EVALUATION.md, "deploy"): one `evaluate` run per model.

Usage: PYTHONPATH=. python scripts/compare_deploy_candidates.py pi0 rec,emb,ea,sig8,sigrtn,sigw8
(candidate keys: `deploy_candidates.CANDIDATES`). Same harness settings as `duquant-jax eval --calib-batches 0
--episodes 2 --chunks 25`; prints one line per candidate.
"""
import sys
import time

from duquant_jax.evaluate import evaluate, EvalConfig, Variant

from deploy_candidates import resolve

model = sys.argv[1]
names = sys.argv[2].split(",")
cfg = EvalConfig(episodes=2, chunks=25, calib_batches=0)
t=time.time()
variants = [Variant(name=resolve(n).name, cfg=resolve(n), calib_batches=None) for n in names]
rep = evaluate(model, variants, cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
for r in rep.results:
  print(model, r.name, f"err {r.action_err_mean:.4f} p99 {r.action_err_p99:.4f} drift25 {r.drift.get(25, float('nan')):.4f} bytes {r.bytes_packed/r.bytes_fp:.3f} layer {r.layer_err_mean:.4f} worst {r.layer_err_worst[:2]}", flush=True)
print("time", time.time()-t)
