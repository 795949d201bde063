"""`python -m diffusion_jax.input_pipeline --prepare NAME ...`: see `prepare`."""

import sys

from diffusion_jax import errors
from diffusion_jax.input_pipeline.prepare import main

if __name__ == "__main__":
    with errors.reported():
        sys.exit(main())
