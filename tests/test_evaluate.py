"""Tests of the evaluation harness (duquant_jax.lab.evaluate): known-answer metrics, variants."""

import numpy as np
import pytest

from duquant_jax.lab import evaluate as ev
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
