"""Evaluators (big_vision style), chosen by `config.eval.evaluators`, and the job that runs
them over checkpoints (`job.evaluate_checkpoints`, `--mode eval`).

| name | module | what it reports |
| --- | --- | --- |
| bpd | `bpd.py` | the variational bound in bits/dim, rate/distortion (DDPM eq. 5, §4.3) |
| ode_bpd | `ode_bpd.py` | bits/dim by the probability-flow ODE (Song et al. 2021), its SE, NFE |
| samples | `pictures.py` | the sample grid and the progressive strip (DDPM Fig. 6) |
| interpolation | `pictures.py` | latent interpolation (DDPM §4.4, Fig. 8) |
| fid | `fid.py` | FID and Inception Score of `eval.num_samples` samples |
| quality | `quality.py` | digits FD / classifier scores, swiss-roll energy distance / MMD |

Each is built as `cls(context, **options)` and called as `run(params, step) -> dict`; see
`base.py` for the interface.

Configured instances (big_vision style): a name in `config.eval.evaluators` is an evaluator
type above, or an instance of `config.eval.instances`, {name: {'type': ..., 'sampling': {...},
'eval': {...}}}, whose `sampling` and `eval` settings override the config's for that instance
alone, e.g. FID at 20-step DPM-Solver++ next to FID at the 1000-step chain in one job:

    config.eval.instances = {"fid_dpm20": {"type": "fid", "sampling": {"method": "dpm_solver++",
                                                                        "num_steps": 20}}}
    config.eval.evaluators = ("fid", "fid_dpm20")

An instance named other than its type reports its metrics and pictures prefixed with its name
('fid_dpm20/fid'); an instance with its own sampling settings draws its own sample shards
(`DIR/eval/samples/<instance>/<step>/`), the others share `DIR/eval/samples/<step>/`.
"""
