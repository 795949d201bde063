"""Entry point: `python -m diffusion_jax.main --config configs/cifar10.py --workdir DIR`.

Modes: train (default), distill (progressive distillation of the teacher the config names),
consistency (consistency distillation or tuning from the teacher the config names), eval
(watch DIR and evaluate each checkpoint once), sample (draw samples from the latest
checkpoint). Every config value can be overridden on the command
line, e.g. `--config.training.batch_size=64`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow (clu's writers, tf.data) prints oneDNN and absl start-up notices otherwise.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax import MODES
from diffusion_jax.runtime import errors, paths  # noqa: E402

paths.make_configs_importable()

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, logs, images.")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.DEFINE_bool(
    "debug", False, f"Show the traceback of user errors too (or set {errors.DEBUG_ENV}=1)."
)
flags.mark_flags_as_required(["config", "workdir"])


def config_path() -> str:
    return config_flags.get_config_filename(FLAGS["config"])


def run(mode: str, config, workdir: str) -> None:
    import jax

    from diffusion_jax.runtime import cache, distributed

    distributed.maybe_initialize_distributed()
    cache.enable(config)
    logging.info("JAX devices: %s", jax.devices())
    if mode in ("train", "distill", "consistency"):
        from diffusion_jax.training import config_checks, loop

        config_checks.check_task(config, mode)
        loop.train(config, workdir)
        if jax.process_index() == 0:
            from diffusion_jax.sampling import registry

            base = f"python -m diffusion_jax.main --config {config_path()} --workdir {workdir}"
            # a student samples with its own steps; a config sampling with the full chain
            # is shown a 20-step solver
            slow = mode == "train" and registry.build(config).nfe > 100
            solver = " --config.sampling.method=dpm_solver++ --config.sampling.num_steps=20"
            solver = solver if slow else ""
            print(
                f"Next:\n  {base} --mode eval --config.eval.once=True\n"
                f"  {base} --mode sample{solver}",
                flush=True,
            )
    elif mode == "eval":
        from diffusion_jax.evaluation import job

        job.evaluate_checkpoints(config, workdir)
    else:
        from diffusion_jax.evaluation import sample_job

        sample_job.sample(config, workdir)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax and clu are chatty at INFO
        logging.set_verbosity(logging.WARNING)
    with errors.reported(FLAGS.debug):
        run(FLAGS.mode, load_config(), FLAGS.workdir)


def load_config():
    """FLAGS.config; UserError when the file does not exist or does not load."""
    try:
        config = FLAGS.config
        config.keys()  # a config file that failed to load raises here, on first use
    except (OSError, SyntaxError, AttributeError, ImportError) as e:
        path = config_path()
        reason = "no such file" if not os.path.isfile(path) else f"{type(e).__name__}: {e}"
        raise errors.UserError(f"cannot load --config {path}: {reason.splitlines()[0]}") from e
    return config


if __name__ == "__main__":
    app.run(main)
