"""The time-grid samplers at their defaults against diffusers' schedulers on Gaussian data
(`tools.benchmark.solver_error`): at every NFE from 5 to 100 at least as accurate as the
errors diffusers 0.32.2 reached on the same problem (`tests/data/diffusers_solver_error.json`,
written by `python launch/solver_error_peer.py --problem spectrum --out ...`)."""

import json
from pathlib import Path

import numpy as np
import pytest

from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.tools.benchmark import solver_error

PEER = json.loads((Path(__file__).parent / "data" / "diffusers_solver_error.json").read_text())


def test_the_exact_flow_is_what_a_fine_solver_converges_to():
    """The oracle itself: UniPC-3 at 400 steps to sigma = 0 lands on the closed-form flow of
    variance 0.25 (to the error of the last step, from t = 1/T to 0)."""
    fine = {"method": "unipc", "num_steps": 400, "order": 3, "denoise_to_zero": True}
    err, nfe = solver_error.error(fine, "scalar")
    assert nfe == 400 and err < 5e-4
    assert solver_error.error({**fine, "num_steps": 5}, "scalar")[0] > 10 * err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpm_solver++", "dpm_solver (2M)", "unipc", "ddim"])
def test_at_least_as_accurate_as_diffusers_at_every_nfe(method):
    assert PEER["problem"] == "spectrum"
    ours = {}
    for n in solver_error.NFES:
        try:
            ours[n] = solver_error.error(solver_error.METHODS[method](n))[0]
        except ConfigError:  # DDIM's stride rule keeps no exact n of 1000 steps
            assert method == "ddim"
    assert len(ours) >= 7 and np.all(np.isfinite(list(ours.values())))
    worse = {n: (e, PEER["errors"][method][str(n)]) for n, e in ours.items()}
    assert not {n: v for n, v in worse.items() if v[0] > v[1]}, worse
