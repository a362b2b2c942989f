"""The `deploy` candidates measured on the demo (EVALUATION.md, "deploy"): one `evaluate` run per model.

Usage: PYTHONPATH=. python scripts/compare_deploy_candidates.py pi0 rec,emb,ea,sig8,sigrtn,sigw8 [CHUNKS [OUT [EPISODES [EVAL_TIMES]]]]
(candidate keys: `deploy_candidates.CANDIDATES`). Same harness settings as `duquant-jax eval --calib-batches 0
--episodes EPISODES --chunks CHUNKS` (defaults 2 and 25; EVAL_TIMES chunk times per episode give the
held-out observations, default 3); prints one line per candidate, and with OUT (- for none) writes
the report as OUT.json and its markdown tables (per-step errors, drift) as OUT.md.
"""
import pathlib
import sys
import time

from duquant_jax.lab.evaluate import evaluate, EvalConfig, Variant, format_markdown

from deploy_candidates import resolve

model = sys.argv[1]
names = sys.argv[2].split(",")
chunks = int(sys.argv[3]) if len(sys.argv) > 3 else 25
out = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
episodes = int(sys.argv[5]) if len(sys.argv) > 5 else 2
eval_times = int(sys.argv[6]) if len(sys.argv) > 6 else 3
cfg = EvalConfig(episodes=episodes, chunks=chunks, calib_batches=0, eval_times=eval_times)
t=time.time()
variants = [Variant(name=resolve(n).name, cfg=resolve(n), calib_batches=None) for n in names]
rep = evaluate(model, variants, cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
for r in rep.results:
  print(model, r.name, f"err {r.action_err_mean:.4f} p99 {r.action_err_p99:.4f} drift25 {r.drift.get(25, float('nan')):.4f} drift{chunks} {r.drift.get(chunks, float('nan')):.4f} steps {r.step_err_mean[0]:.3f}/{r.step_err_mean[len(r.step_err_mean) // 2]:.3f}/{r.step_err_mean[-1]:.3f} bytes {r.bytes_packed/r.bytes_fp:.3f} layer {r.layer_err_mean:.4f} worst {r.layer_err_worst[:2]}", flush=True)
if out:
  pathlib.Path(out + ".json").write_text(rep.to_json())
  pathlib.Path(out + ".md").write_text(format_markdown(rep) + "\n")
print("time", time.time()-t)
