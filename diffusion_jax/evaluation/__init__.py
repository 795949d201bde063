"""Evaluators (big_vision style), configured as instances in `config.evals` and run by the
job over checkpoints (`job.evaluate_checkpoints`, `--mode eval`).

| type | module | what it reports |
| --- | --- | --- |
| bpd | `bpd.py` | the variational bound in bits/dim, rate/distortion (DDPM eq. 5, §4.3) |
| ode_bpd | `ode_bpd.py` | bits/dim by the probability-flow ODE (Song et al. 2021), its SE, NFE |
| samples | `pictures.py` | the sample grid and the progressive strip (DDPM Fig. 6) |
| interpolation | `pictures.py` | latent interpolation (DDPM §4.4, Fig. 8) |
| fid | `fid.py` | FID and Inception Score of `num_samples` samples |
| quality | `quality.py` | digits FD / classifier scores, swiss-roll energy distance / MMD |

An instance is `config.evals.<name> = dict(type=<type>, **settings)`; its settings are the
keyword-only arguments of the type's constructor, all required, checked before anything
compiles (`evaluators.check_config`). `config.eval.evaluators` names the instances a job runs,
in order. An optional `sampling=dict(...)` overrides `config.sampling` for that instance, e.g.
FID at 20-step DPM-Solver++ next to FID at the 1000-step chain in one job:

    config.evals.fid_dpm20 = dict(
        config.evals.fid.to_dict(), sampling=dict(method="dpm_solver++", num_steps=20)
    )
    config.eval.evaluators = ("fid", "fid_dpm20")

An instance named other than its type reports its metrics and pictures prefixed with its name
('fid_dpm20/fid'); an instance with its own sampling settings draws its own sample shards
(`DIR/eval/samples/<instance>/<step>/`), the others share `DIR/eval/samples/<step>/` (each
reads as many as its `num_samples`). Each is built as `cls(context, **settings)` and called as
`run(params, step) -> dict`; see `base.py` for the interface.
"""
