"""`python -m diffusion_jax.input_pipeline --prepare NAME ...`: see `prepare`."""

import sys

from diffusion_jax.input_pipeline.prepare import main
from diffusion_jax.runtime import errors

if __name__ == "__main__":
    with errors.reported():
        sys.exit(main())
