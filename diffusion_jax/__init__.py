"""diffusion_jax: DDPM and Improved DDPM in JAX/Flax NNX."""

__version__ = "0.1.0"

# What `python -m diffusion_jax.main --mode` runs; `config_checks` validates each. Here, where
# importing it costs nothing (`main` reads it before it imports JAX).
MODES = ("train", "distill", "consistency", "eval", "sample")
