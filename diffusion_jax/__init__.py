"""diffusion_jax: DDPM and Improved DDPM in JAX/Flax NNX."""

__version__ = "0.1.0"
