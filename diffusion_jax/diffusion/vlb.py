"""The full-chain variational bound in bits/dim (DDPM eq. 5, §4.3 rate/distortion).

total = L_T (prior) + sum_{t>1} L_{t-1} + L_0 (decoder), evaluated at every t with one fresh
x_t ~ q(x_t | x_0) per t. The loop over t is a `lax.scan`, so it compiles once and its working
memory is that of one denoiser call whatever T is (only the [B, T] outputs grow with T).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion.losses import mean_flat, prior_bpd, vb_terms_bpd
from diffusion_jax.diffusion.process import NoiseProcess, q_sample

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def calc_bpd_loop(
    diffusion: NoiseProcess,
    denoise_fn: DenoiseFn,
    x_start: jax.Array,
    key: jax.Array,
    clip_denoised: bool = True,
) -> dict[str, jax.Array]:
    """Bits/dim of x_start [B, H, W, C] (data in [-1, 1]) under the full chain.

    `denoise_fn(x_t, timesteps)` returns the network output for original timesteps [B].
    Returns total_bpd [B], prior_bpd [B], vb [B, T] (vb[:, i] is L_{i} in the paper's
    numbering: the decoder term at i = 0), x0_mse [B, T] (MSE of x0_hat on the [-1, 1]
    scale, the distortion of §4.3) and eps_mse [B, T].
    """
    batch = x_start.shape[0]
    timesteps = jnp.asarray(diffusion.timesteps, jnp.int32)  # the network's timestep per position

    def term(_, i):
        t = jnp.full((batch,), i, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, i), x_start.shape, x_start.dtype)
        x_t = q_sample(diffusion, x_start, t, noise)
        output = denoise_fn(x_t, timesteps[t])
        vb, p = vb_terms_bpd(diffusion, output, x_start, x_t, t, clip_denoised)
        return None, (
            vb,
            mean_flat(jnp.square(p.pred_x0 - x_start)),
            mean_flat(jnp.square(p.pred_eps - noise)),
        )

    steps = jnp.arange(diffusion.num_timesteps - 1, -1, -1)
    _, (vb, x0_mse, eps_mse) = jax.lax.scan(term, None, steps)
    # scan ran t = T-1 .. 0; flip so that column i holds timestep i.
    vb, x0_mse, eps_mse = (jnp.flip(a, 0).T for a in (vb, x0_mse, eps_mse))
    prior = prior_bpd(diffusion, x_start)
    return {
        "total_bpd": jnp.sum(vb, axis=1) + prior,
        "prior_bpd": prior,
        "vb": vb,
        "x0_mse": x0_mse,
        "eps_mse": eps_mse,
    }


def rate_distortion(bpd: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """DDPM §4.3 progressive coding, averaged over the batch; entry i is timestep index i.

    Having received x_T .. x_{i+1} (paper numbering), the receiver has spent
    rate[i] = L_T + sum_{s > i} L_s bits/dim and reconstructs x0_hat(x_{i+1}) with
    distortion[i] = RMSE(x_0, x0_hat) on the 0-255 scale. The reverse process reads the
    arrays from i = T-1 down to 0; rate[0] is the paper's total rate (1.78 on CIFAR-10).
    """
    kl = jnp.mean(bpd["vb"], axis=0).at[0].set(0.0)  # drop the decoder term L_0
    received_after = jnp.flip(jnp.cumsum(jnp.flip(kl))) - kl  # sum_{s > i} L_s
    return {
        "rate": jnp.mean(bpd["prior_bpd"]) + received_after,
        "distortion": jnp.sqrt(jnp.mean(bpd["x0_mse"], axis=0)) * 127.5,
    }
