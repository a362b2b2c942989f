"""Tests of the head-structure diagnostic (duquant_jax.lab.diagnose)."""

import json

import numpy as np

from duquant_jax.lab.diagnose import head_structure, run_diagnose


def test_diagnose_writes_files(tmp_path):
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
