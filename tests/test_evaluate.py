"""Tests of the evaluation harness (duquant_jax.evaluate) and the head diagnostic (diagnose)."""

import json

import numpy as np
import pytest

from duquant_jax.lab import evaluate as ev
from duquant_jax.cli import main
from duquant_jax.lab.demo import action_rel_err


def test_identical_gives_zero_error_and_drift():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 5, 4))
  v = rng.normal(size=(10, 3, 5, 4))
  states = rng.normal(size=(11, 3, 4))
  assert np.all(action_rel_err(a, a) == 0)
  assert np.all(ev.flow_step_errors(v, v) == 0)
  div = ev.state_divergence(states, states)
  assert div.shape == (11,) and np.all(div == 0)
  assert ev.first_exceeding(div, 1e-9) is None


def test_known_perturbation():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(4, 6, 3))
  np.testing.assert_allclose(action_rel_err(1.1 * a, a), 0.1, rtol=1e-12)
  v = rng.normal(size=(5, 4, 6, 3))
  np.testing.assert_allclose(ev.flow_step_errors(1.1 * v, v), 0.1, rtol=1e-12)
  mean, p99 = ev.error_summary(np.array([0.1] * 99 + [1.1]))
  assert mean == pytest.approx(0.11) and 0.1 < p99 <= 1.1
  # A constant offset of 0.3 in one state coordinate, growing by 0.1 per chunk.
  s_fp = np.zeros((7, 2, 3))
  s_q = s_fp.copy()
  s_q[:, :, 0] = 0.1 * np.arange(7)[:, None]
  div = ev.state_divergence(s_q, s_fp)
  np.testing.assert_allclose(div, 0.1 * np.arange(7), atol=1e-12)
  assert ev.first_exceeding(div, 0.25) == 3
  assert ev.drift_at(div) == {1: pytest.approx(0.1), 5: pytest.approx(0.5)}  # 10+ not reached


def test_parse_variant():
  v = ev.parse_variant("recommended+rot=weight_svd+alpha=none@c32")
  assert v.calib_batches == 32
  assert all(r.rotation == "weight_svd" and r.smooth_alpha is None for r in v.cfg.rules)
  assert ev.parse_variant("w4a8-rtn").calib_batches is None
  for bad in ("nope", "recommended+foo=1", "recommended+rot=spin", "recommended@x3",
              "recommended+block=abc"):
    with pytest.raises(ValueError):
      ev.parse_variant(bad)


def test_eval_command_end_to_end(tmp_path, capsys):
  js, png, md = tmp_path / "e.json", tmp_path / "d.png", tmp_path / "e.md"
  with pytest.raises(SystemExit) as e:
    main(["eval", "--model", "pi0", "--presets", "fp,w4a8-rtn", "--calib-batches", "2",
          "--episodes", "2", "--chunks", "2", "--json", str(js), "--plot", str(png),
          "--markdown", str(md), "--quiet"])
  assert e.value.code == 0
  rep = json.loads(js.read_text())
  fp, rtn = rep["results"]
  assert fp["action_err_mean"] == 0 and fp["drift_curve"] == [0.0, 0.0, 0.0]
  assert fp["exceeds_at"] is None
  assert 0.05 < rtn["action_err_mean"] < 0.6 and rtn["drift_curve"][-1] > 0
  assert len(rtn["step_err_mean"]) == 10 and len(rtn["layer_err_worst"]) == 5
  assert 0.0 < rtn["layer_err_mean"] < 0.5 and rtn["bytes_packed"] < rtn["bytes_fp"] / 3
  assert png.stat().st_size > 1000 and "| w4a8-rtn |" in md.read_text()
  assert "drift@1" in capsys.readouterr().out


def test_eval_command_bad_variant(capsys):
  with pytest.raises(SystemExit) as e:
    main(["eval", "--presets", "recommended+rot=spin"])
  assert e.value.code == 2
  assert "error:" in capsys.readouterr().err


def test_diagnose_writes_files(tmp_path):
  from duquant_jax.lab.diagnose import head_structure, run_diagnose
  # Known case: 2 heads whose channels are orthogonal within and across heads.
  m = np.eye(4).reshape(4, 2, 2).transpose(1, 0, 2)[None]  # (L=1, N=2, D=4, H=2)
  hs = head_structure(m)
  np.testing.assert_allclose(hs["intra"], 0, atol=1e-12)
  np.testing.assert_allclose(hs["inter"][0], np.eye(2), atol=1e-12)
  text = run_diagnose("pi0", out=str(tmp_path), calib_batches=1, block_sizes=(16, 0),
                      log=lambda s: None)
  assert "Does block 16 damage head structure?" in text and "Answer" in text
  for name in ("q_einsum", "kv_einsum_1", "attn_vec_einsum_1"):
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
  assert json.loads((tmp_path / "summary.json").read_text())["head_dim"] == 64
