"""Every sampler as a stepper over one step table, on the one noise process.

Read in this order (one direction, no climbing back up):

- `process.NoiseProcess` (outside the package): the noise process of `config.diffusion`
  (float64 knots of log alpha_t), alpha, sigma, lambda, the (respaced) chain's posterior
  coefficients, `model_timestep` (the ONE map from time to the network's input) and the
  parameterisations (`eps_and_x0`, `model_log_variance`);
- `grids.py`: every step grid: the full and respaced chains (respacing strings, DDIM uniform
  and quadratic, one rule each) and the ODE solvers' time grids (uniform, logsnr, quadratic,
  karras; `denoise_to_zero`), shared with the probability-flow likelihood;
- `steppers.py`: `Stepper` = a step table (host arrays, one row a step) + `step(carry, row,
  predict, noise)`: ancestral, the multistep family (DDIM, DPM-Solver, DPM-Solver++,
  SDE-DPM-Solver++), singlestep DPM-Solver, Heun, UniPC;
- `run.py`: the clip-aware `predict`, the x_T draw, one `lax.scan` over the table,
  snapshots; guidance and the latent interpolation;
- `registry.py`: method name -> stepper and grid, allowed spacings/orders, defaults,
  validation (`ConfigError`) and the settings recorded beside the samples.

`generation.make_sampler` = `registry.build` + `run.sample` + sharding.
"""
