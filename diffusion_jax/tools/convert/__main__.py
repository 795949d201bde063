"""`python -m diffusion_jax.tools.convert`: see `cli.py`."""

from diffusion_jax.tools.convert.cli import main

main()
