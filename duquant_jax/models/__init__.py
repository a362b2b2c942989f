"""pi0 / pi0.5 models in openpi's param layout: config, networks, synthetic weights, observations."""

from duquant_jax.models.config import (ATTENTIONS, GEMMA, IMAGE_KEYS, MODELS, SIGLIP, SIZES,
                                       GemmaConfig, Pi0Config, SiglipConfig, get_config)
from duquant_jax.models.observation import (Observation, as_observation, make_observation,
                                            validate_observation)
from duquant_jax.models.pi0 import Pi0, Policy, flow_times, get_policy, make_attn_mask
from duquant_jax.models.runtime import FloatRuntime, Runtime

__all__ = [
    "ATTENTIONS", "GEMMA", "IMAGE_KEYS", "MODELS", "SIGLIP", "SIZES", "GemmaConfig", "Pi0Config",
    "SiglipConfig", "get_config", "Observation", "as_observation", "make_observation",
    "validate_observation", "Pi0", "Policy", "flow_times", "get_policy", "make_attn_mask",
    "FloatRuntime", "Runtime",
]
