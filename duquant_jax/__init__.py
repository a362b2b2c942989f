"""duquant-jax: DuQuant W4A8 quantization of openpi pi0 / pi0.5 policies in JAX."""
__version__ = "0.1.0"
