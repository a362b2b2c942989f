"""Tests of the synthetic demo weights (duquant_jax.lab.synthetic): deterministic, with outliers."""

import jax
import numpy as np

from conftest import demo_params
from duquant_jax.lab.synthetic import outlier_channels, realistic_params
from duquant_jax.models import get_policy


def test_realistic_params_deterministic_and_have_outliers(model_name):
  policy = get_policy(model_name, "demo")
  a = demo_params(model_name)
  b = realistic_params(policy, seed=0)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  c = realistic_params(policy, seed=1)
  assert not np.array_equal(a["action_in_proj"]["kernel"], c["action_in_proj"]["kernel"])
  # Non-zero vision head and (pi0.5) adaptive norms, which openpi zero-initialises.
  assert np.abs(a["PaliGemma"]["img"]["head"]["kernel"]).max() > 0
  if model_name == "pi05":
    norm = a["PaliGemma"]["llm"]["layers"]["pre_attention_norm_1"]["Dense_0"]["kernel"]
    assert np.abs(norm).max() > 0
  # Residual-stream outlier channels: tens to hundreds of times the median channel.
  emb = np.abs(a["PaliGemma"]["llm"]["embedder"]["input_embedding"][3:])
  ch = emb.max(axis=0)
  ratio = ch[outlier_channels(policy.cfg.llm.width, 0)] / np.median(ch)
  assert np.all(ratio > 20) and np.all(ratio < 1000), ratio
  # Heavy tails: excess kurtosis well above a Gaussian's 0.
  w = a["PaliGemma"]["llm"]["layers"]["mlp"]["linear"].ravel()
  kurt = np.mean((w - w.mean()) ** 4) / np.var(w) ** 2 - 3
  assert kurt > 1.0
