import functools

import jax
import pytest

from duquant_jax.models import get_policy
from duquant_jax.models.synthetic import realistic_params


@functools.cache
def demo_params(model: str = "pi0", seed: int = 0):
  """Realistic demo params, built once per test session."""
  return realistic_params(get_policy(model, "demo"), seed)


@pytest.fixture(params=["pi0", "pi05"])
def model_name(request):
  return request.param


@pytest.fixture
def demo(model_name):
  policy = get_policy(model_name, "demo")
  return policy, demo_params(model_name)


@pytest.fixture
def demo_obs(demo):
  policy, _ = demo
  return policy.example_observation(jax.random.key(1), batch_size=2)
