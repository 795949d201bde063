"""The samplers by name: method -> stepper and grid, allowed spacings and orders, defaults,
validation of `config.sampling`, and the settings recorded beside the samples.

| method             | sampler (stepper)                                  | grid  | NFE          |
|--------------------|----------------------------------------------------|-------|--------------|
| `ancestral`        | DDPM Algorithm 2 (`ancestral`)                     | chain | chain length |
| `ddim`             | DDIM eq. 12 with `eta` (`multistep`, order 1)      | chain | chain length |
| `dpm_solver++`     | DPM-Solver++(2M), data prediction (Lu et al. 2022b)| time  | num_steps    |
| `sde_dpm_solver++` | SDE-DPM-Solver++(2M), stochastic (Lu et al. 2022b) | time  | num_steps    |
| `dpm_solver`       | DPM-Solver-1/2/3 singlestep or multistep (2022a)   | time  | num_steps    |
| `unipc`            | UniPC, UniP-p + UniC, bh1 / bh2 (Zhao et al. 2023) | time  | num_steps    |
| `heun`             | Karras et al. 2022 Algorithm 1, S_churn = 0        | time  | 2 steps - 1  |
| `consistency`      | consistency model, one or multistep (CM Alg. 1)    | time  | num_steps    |

Chain grids come from `sampling.respacing` or `num_steps` with `spacing` (`grids.chain_
timesteps`; a 'ddimN' respacing selects DDIM; DDIM's `trailing` spacing steps i / N, `grids.
trailing`, the grid distilled students sample on); time grids from `num_steps`, `spacing` and
`denoise_to_zero` (`grids.time_grid`). A new sampler is a stepper in `steppers.py` and one
entry in `METHODS` (+ its branch in `build`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from diffusion_jax.diffusion import grids, process
from diffusion_jax.diffusion.process import ODE_MODEL_OUTPUTS, NoiseProcess
from diffusion_jax.runtime.errors import ConfigError, check_choice
from diffusion_jax.sampling import steppers
from diffusion_jax.sampling.steppers import Stepper


@dataclasses.dataclass(frozen=True)
class Method:
    chain: bool  # steps over a (respaced) chain; else over a time grid of num_steps
    spacings: tuple[str, ...]
    default_spacing: str
    orders: tuple[int, ...] = (1,)
    default_order: int = 1
    variants: tuple[str, ...] = ()  # sampling.dpm_solver_variant / sampling.unipc_variant
    denoise_to_zero: bool = False  # whether sampling.denoise_to_zero applies
    multistep: bool = False  # uses sampling.lower_order_final


_TIME = grids.TIME_SPACINGS
METHODS: dict[str, Method] = {
    "ancestral": Method(True, grids.CHAIN_SPACINGS, "uniform"),
    "ddim": Method(True, grids.CHAIN_SPACINGS + (grids.TRAILING,), "uniform"),
    "dpm_solver++": Method(False, _TIME, "logsnr", (1, 2), 2, (), True, True),
    "sde_dpm_solver++": Method(False, _TIME, "logsnr", (1, 2), 2, (), True, True),
    "dpm_solver": Method(False, _TIME, "logsnr", (1, 2, 3), 3, ("singlestep", "multistep"), True),
    "unipc": Method(False, _TIME, "logsnr", (1, 2, 3), 2, ("bh2", "bh1"), True, True),
    "heun": Method(False, _TIME, "quadratic", (2,), 2),
    "consistency": Method(False, _TIME, "logsnr"),
}
SPACINGS = tuple(dict.fromkeys(grids.CHAIN_SPACINGS + (grids.TRAILING,) + _TIME))
VARIANT_FIELD = {"dpm_solver": "dpm_solver_variant", "unipc": "unipc_variant"}


def _allowed(values: Any) -> str:
    return ", ".join(str(v) for v in values)


def method_name(sampling: Any, respacing: str = "") -> str:
    """`sampling.method`, except that a 'ddimN' respacing turns 'ancestral' into 'ddim'."""
    method = sampling.get("method", "ancestral")
    if method == "ancestral" and respacing.strip().startswith("ddim"):
        return "ddim"
    return method


def denoise_to_zero(sampling: Any, name: str, variant: str) -> bool:
    """`sampling.denoise_to_zero`, or where unset (None) the method's default: True (the grid's
    last point replaced by sigma = 0, `grids.time_grid`), except singlestep DPM-Solver, whose
    last call would become an order-1 step to 0 (10 NFE on Gaussian data: 0.38 against 0.04
    relative error). On Gaussian data with an exact network the multistep solvers to 0 are
    more accurate than stopping at t = 1/T on a single variance at every NFE from 5 to 100;
    on a spread of variances mixed (UniPC 17-31% less accurate from 8 to 40 NFE), and ahead
    of diffusers' either way (BENCHMARKS "Solver error against diffusers")."""
    value = sampling.get("denoise_to_zero", None)
    if value is None:
        return not (name == "dpm_solver" and variant == "singlestep")
    return bool(value)


def default_spacing(name: str, schedule: str = "") -> str:
    """The spacing of method `name` when `sampling.spacing` is '': `METHODS`' default, except
    Heun on the cosine schedule, which takes `logsnr` instead of `quadratic`. Quadratic (and
    uniform) steps make Heun's first step jump from t = 1, where the cosine schedule's clipped
    last beta leaves alpha ~ 1e-4 and the network's x0_hat is worst, straight to sigma ~ 3,
    so that error stays in the sample (digits model, 19 NFE, two-sample test 0.91 quadratic,
    0.93 uniform, 0.60 logsnr, 0.60 karras); on the linear schedule quadratic steps are the
    most accurate on Gaussian data (BENCHMARKS "Solver error against diffusers")."""
    if name == "heun" and schedule == "cosine":
        return "logsnr"
    return METHODS[name].default_spacing


def resolved(sampling: Any, respacing: str = "", schedule: str = "") -> dict[str, Any]:
    """The settings a sample depends on, '' / 0 replaced by the method's defaults (the spacing
    on `schedule`, `default_spacing`) and None
    where the method does not use them: method, respacing, num_steps, spacing, order,
    dpm_solver_variant, lower_order_final, eta (+ denoise_to_zero and unipc_variant when they
    apply, so that records of the samplers that lack them keep their keys)."""
    name = method_name(sampling, respacing)
    m = METHODS[name]
    num_steps = int(sampling.get("num_steps", 0))
    variant = sampling.get(VARIANT_FIELD.get(name, ""), "") or (m.variants or ("",))[0]
    multistep = m.multistep or (name == "dpm_solver" and variant == "multistep")
    out = {
        "method": name,
        "respacing": respacing,
        "num_steps": num_steps,
        "spacing": (sampling.get("spacing", "") or default_spacing(name, schedule))
        if (not m.chain or num_steps > 0)
        else None,
        "order": (int(sampling.get("order", 0)) or m.default_order) if not m.chain else None,
        "dpm_solver_variant": variant if name == "dpm_solver" else None,
        "lower_order_final": bool(sampling.get("lower_order_final", True)) if multistep else None,
        "eta": float(sampling.get("eta", 0.0)) if name == "ddim" else None,
    }
    if m.denoise_to_zero and denoise_to_zero(sampling, name, variant):
        out["denoise_to_zero"] = True
    if name == "unipc":
        out["unipc_variant"] = variant
    return out


def validate(sampling: Any, num_timesteps: int, model_output: str | None = None) -> None:
    """Checks `config.sampling` before anything compiles: ConfigError naming the bad value and
    the allowed ones for an unknown method, spacing or variant, num_steps < 0 or > T (0 = not
    given; the time-grid samplers need >= 1), an order the method lacks, num_steps > 0 together
    with a `respacing` string (chain samplers: set one of them), a respacing string with a
    time-grid sampler (they take num_steps), a DDIM step count no stride gives, and (when
    given) a model output without a form at arbitrary times (xprev) for a time-grid sampler.
    `denoise_to_zero` is accepted by every method: the chain, heun and consistency always end
    at sigma = 0, so a config whose default sampler sets it can switch to them with one flag."""
    method = sampling.get("method", "ancestral")
    check_choice("sampling.method", method, METHODS)
    respacing = sampling.get("respacing", "")
    name = method_name(sampling, respacing)
    m = METHODS[name]
    spacing, order = sampling.get("spacing", ""), sampling.get("order", 0)
    num_steps, T = sampling.get("num_steps", 0), int(num_timesteps)
    if spacing and spacing not in SPACINGS:
        raise ConfigError(
            f"sampling.spacing={spacing!r} is not supported; allowed: '' (the method's "
            f"default), {_allowed(SPACINGS)}"
        )
    if spacing and spacing not in m.spacings:
        raise ConfigError(
            f"sampling.spacing={spacing!r} is not available for method {name!r}; allowed: "
            f"{_allowed(m.spacings)}"
        )
    if int(order) != order or (order and order not in m.orders):
        raise ConfigError(
            f"sampling.order={order!r} is not available for method {name!r}; allowed: 0 (the "
            f"default, {m.default_order}), {_allowed(m.orders)}"
        )
    for method_with, field in VARIANT_FIELD.items():
        value = sampling.get(field, "")
        allowed = METHODS[method_with].variants
        if value:
            check_choice(f"sampling.{field}", value, allowed)
    if int(num_steps) != num_steps or not 0 <= num_steps <= T:
        raise ConfigError(
            f"sampling.num_steps={num_steps!r} must be 0 (not given) or lie in [1, {T}]"
        )
    if not m.chain and num_steps < 1:
        raise ConfigError(
            f"sampling.num_steps={num_steps!r}: method {name!r} needs num_steps in [1, {T}]"
        )
    if not m.chain and model_output is not None and model_output not in ODE_MODEL_OUTPUTS:
        raise ConfigError(
            f"diffusion.model_output={model_output!r} has no ODE form for method {name!r}; "
            f"allowed: {_allowed(ODE_MODEL_OUTPUTS)}"
        )
    if respacing and m.chain and num_steps:
        raise ConfigError(
            f"sampling.num_steps={num_steps} and sampling.respacing={respacing!r} both choose "
            "the chain; set one of them (num_steps=0 or respacing='')"
        )
    if respacing and not m.chain:
        raise ConfigError(
            f"sampling.respacing={respacing!r} applies to the chain methods (ancestral, ddim); "
            f"method {name!r} takes sampling.num_steps, so set respacing=''"
        )
    if spacing == grids.TRAILING and (respacing or not num_steps):
        raise ConfigError(
            f"sampling.spacing={spacing!r} steps i / num_steps: give sampling.num_steps and "
            "sampling.respacing=''"
        )
    if m.chain and spacing != grids.TRAILING:
        _chain_timesteps(sampling, name, T, respacing)


def _chain_timesteps(sampling: Any, name: str, num_timesteps: int, respacing: str) -> list[int]:
    num_steps = int(sampling.get("num_steps", 0))
    if respacing or not num_steps:
        return grids.respacing_timesteps(num_timesteps, respacing)
    spacing = sampling.get("spacing", "") or METHODS[name].default_spacing
    return grids.chain_timesteps(name == "ancestral", num_timesteps, num_steps, spacing)


def _singlestep(
    sched: NoiseProcess, num_steps: int, order: int, spacing: str, to_zero: bool
) -> Stepper:
    """DPM-Solver-fast's grid (reference `get_orders_and_timesteps_for_singlestep_solver`): the
    orders of `steppers.singlestep_orders`; outer times uniform in lambda over K steps for
    `logsnr`, else the num_steps grid taken at the cumulative orders; each step's intermediate
    times from the same spacing between its ends (reference `sample(method='singlestep')`).
    `to_zero` spends the last call on an order-1 step to t = 0."""
    head = int(num_steps) - int(to_zero)
    orders = steppers.singlestep_orders(head, order) if head else []
    if not head:
        outer = np.array([sched.t_max])
    elif spacing == "logsnr":
        outer = grids.spaced(sched, sched.t_max, sched.t_min, len(orders), spacing)
    else:
        outer = grids.spaced(sched, sched.t_max, sched.t_min, head, spacing)
        outer = outer[np.cumsum([0] + orders)]
    if to_zero:
        outer, orders = np.append(outer, 0.0), orders + [1]
    inner = np.empty((len(orders), 2))
    for j, o in enumerate(orders):
        if o == 1:
            inner[j] = outer[j]
        else:
            points = grids.spaced(sched, outer[j], outer[j + 1], o, spacing)
            inner[j] = points[1], points[2 if o == 3 else 1]
    return steppers.singlestep(sched, outer, orders, inner)


def build(config: Any, respacing: str | None = None) -> Stepper:
    """The stepper of `config.sampling` (checked first, `validate`) on `config.diffusion`'s
    schedule. `respacing` (default `sampling.respacing`) is the chain of the chain samplers
    (it wins over `num_steps`, as training previews' `preview_respacing` does); the time-grid
    samplers ignore it, so previews run the configured solver."""
    s = config.sampling
    validate(s, config.diffusion.num_timesteps, config.diffusion.model_output)
    respacing = s.get("respacing", "") if respacing is None else respacing
    if not METHODS[method_name(s, respacing)].chain:
        respacing = ""
    sched = process.from_config(config.diffusion)
    r = resolved(s, respacing, config.diffusion.schedule)
    name, n, spacing, order = r["method"], r["num_steps"], r["spacing"], r["order"]
    if name == "ancestral":
        return steppers.ancestral(sched, _chain_timesteps(s, name, sched.num_timesteps, respacing))
    if name == "ddim":
        if spacing == grids.TRAILING:
            grid = grids.trailing(n)
        else:
            grid = grids.chain(sched, _chain_timesteps(s, name, sched.num_timesteps, respacing))
        return steppers.multistep("ddim", sched, grid, np.ones(len(grid) - 1, np.int32), r["eta"])
    to_zero = bool(r.get("denoise_to_zero", False))
    if name == "dpm_solver" and r["dpm_solver_variant"] == "singlestep":
        return _singlestep(sched, n, order, spacing, to_zero)
    if name in ("heun", "consistency"):  # both end at sigma = 0
        stepper = getattr(steppers, name)
        return stepper(sched, grids.time_grid(sched, n, spacing, denoise_to_zero=True))
    grid = grids.time_grid(sched, n, spacing, to_zero)
    below = np.inf if name == "unipc" else steppers.LOWER_ORDER_FINAL_BELOW
    orders = steppers.multistep_orders(n, order, r["lower_order_final"], below)
    if name == "unipc":
        return steppers.unipc(sched, grid, orders, r["unipc_variant"])
    return steppers.multistep(name, sched, grid, orders)
