"""Beta schedules, respacing and the chain's derived quantities (float64 host arrays), from
which `process.NoiseProcess`, the one noise process, is built.

Beta schedules follow the official DDPM code (`linear`, `quad`, `const`, `jsd`, `warmup10`,
`warmup50`) and IDDPM (`cosine`, eq. 17 with s = 0.008, betas clipped at 0.999). All derived
quantities are computed in float64 NumPy and stored as float32 arrays, the same precision
contract as the reference implementations (`NoiseProcess.array`).

Indexing convention: array index `i` (0-based) is the paper's timestep t = i + 1, so
`alphas_cumprod[0]` is alphabar_1 and `alphas_cumprod_prev[0]` is alphabar_0 = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from diffusion_jax.runtime import errors

SCHEDULES = ("linear", "cosine", "quad", "const", "jsd", "warmup10", "warmup50")
MODEL_OUTPUTS = ("eps", "x0", "xprev", "v")
MODEL_VAR_TYPES = ("fixed_large", "fixed_small", "learned", "learned_range")
LEARNED_VARIANCE = ("learned", "learned_range")  # the network also outputs the variance


def cosine_alphas_cumprod(t: np.ndarray, num_timesteps: int, s: float = 0.008) -> np.ndarray:
    """IDDPM eq. 17: alphabar(t) = f(t) / f(0), f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2."""
    f = lambda u: np.cos((u / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    return f(np.asarray(t, np.float64)) / f(0.0)


def get_beta_schedule(
    name: str,
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    max_beta: float = 0.999,
) -> np.ndarray:
    """Returns betas [T] in float64 for a named schedule (DDPM §4 / official code, IDDPM §3.2).

    Betas are clipped to `max_beta` where a schedule would reach 1 (cosine, jsd), as IDDPM
    does: beta = 1 makes alphabar_T = 0, where x0 from eps, the prior term and every ODE
    solver (log alpha = -inf) are not finite."""
    errors.check_choice("diffusion.schedule", name, SCHEDULES)
    if int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise errors.ConfigError(
            f"diffusion.num_timesteps={num_timesteps!r} must be an integer >= 1"
        )
    T = int(num_timesteps)
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif name == "const":
        betas = np.full(T, beta_end, dtype=np.float64)
    elif name == "jsd":  # 1/T, 1/(T-1), ..., 1/2, then max_beta (IDDPM's clip) for the last 1
        betas = np.minimum(1.0 / np.linspace(T, 1, T, dtype=np.float64), max_beta)
    elif name in ("warmup10", "warmup50"):
        betas = np.full(T, beta_end, dtype=np.float64)
        warmup = int(T * {"warmup10": 0.1, "warmup50": 0.5}[name])
        betas[:warmup] = np.linspace(beta_start, beta_end, warmup, dtype=np.float64)
    else:  # cosine
        ac = cosine_alphas_cumprod(np.arange(T + 1), T)
        betas = np.minimum(1.0 - ac[1:] / ac[:-1], max_beta)
    check_betas(betas)
    return betas


def check_betas(betas: np.ndarray) -> None:
    betas = np.asarray(betas)
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    bad = ~((betas > 0) & (betas < 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise errors.ConfigError(
            f"betas must lie in (0, 1) (beta = 1 makes alphabar_T = 0: no finite samples or "
            f"bits/dim); betas[{i}] = {float(betas[i])!r}"
        )


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Timesteps to keep when respacing (IDDPM §4.3 strided sampling).

    `section_counts` is "K" (K steps evenly spaced over [0, T-1], rounded) or a comma list such
    as "10,15,20" (the chain is cut into equal sections, each strided to its count). Returns a
    sorted list of 0-based indices. (The 'ddimN' strings are `sampling.grids`' DDIM rule.)
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise errors.ConfigError(
                f"respacing={spec!r} is not 'K', 'K1,K2,...' or 'ddimN'"
            ) from None
    else:
        counts = [int(c) for c in section_counts]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, taken = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise errors.ConfigError(
                f"respacing: cannot take {count} steps from a section of {size}"
            )
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0  # accumulated like the reference so rounding ties agree
        for _ in range(count):
            taken.append(start + round(position))
            position += stride
        start += size
    return sorted(set(taken))


def respace_betas(betas: np.ndarray, use_timesteps: Sequence[int]) -> np.ndarray:
    """IDDPM §4.3: beta_{S_i} = 1 - alphabar_{S_i} / alphabar_{S_{i-1}} over the kept steps."""
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, np.float64))
    kept = alphas_cumprod[np.asarray(sorted(use_timesteps))]
    return 1.0 - kept / np.append(1.0, kept[:-1])


def schedule_arrays(betas: np.ndarray) -> dict[str, np.ndarray]:
    """All derived schedule quantities in float64 (DDPM eq. 4, 6, 7; IDDPM §3.1)."""
    betas = np.asarray(betas, np.float64)
    check_betas(betas)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)  # eq. 7; 0 at t = 1
    # beta~_1 = 0, so its log is clipped by substituting beta~_2 (official code).
    first = posterior_variance[1] if len(betas) > 1 else betas[0]
    with np.errstate(divide="ignore"):
        return dict(
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            alphas_cumprod_next=np.append(ac[1:], 0.0),
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            log_one_minus_alphas_cumprod=np.log(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(np.append(first, posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),  # eq. 7, x_0 term
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),  # x_t term
        )
