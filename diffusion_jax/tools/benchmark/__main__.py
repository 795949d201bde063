"""`python -m diffusion_jax.tools.benchmark`: the command line (see the package doc).

The measurement flags are `options.Options`' fields; the others say what to do with the
result: `--config`, `--out`, `--compare`, `--peer`, `--peer_args`.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from diffusion_jax.runtime import paths
from diffusion_jax.tools.benchmark import options, report

DEFAULT_CONFIG = paths.REPO_ROOT / "configs" / "cifar10.py"
# Options passed on unchanged to launch/benchmark_peer.py (which has flags of these names).
PEER_OPTIONS = (
    "max_batch",
    "warmup",
    "repeats",
    "iters",
    "sample_images",
    "sample_steps",
    "sample_repeats",
)


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "ml_collections config file.")
    options.define_flags()
    flags.DEFINE_string("out", "", "Write the JSON result here.")
    flags.DEFINE_list("compare", [], "Print result files side by side (ours first) and exit.")
    flags.DEFINE_bool("peer", False, "Also run launch/benchmark_peer.py and compare.")
    flags.DEFINE_list("peer_args", [], "Extra arguments for the peer, e.g. --compile.")


def run_peer(
    opts: options.Options, batch: int, out: str, extra: Sequence[str] = ()
) -> dict[str, Any] | None:
    """Runs the PyTorch peer with matching settings in a subprocess (after our run, so the
    two never compete for the device)."""
    tasks = [t for t in opts.only if t in ("train", "sample", "forward")]
    if not tasks:
        return None
    cmd = [
        sys.executable,
        str(paths.REPO_ROOT / "launch" / "benchmark_peer.py"),
        f"--only={','.join(tasks)}",
        f"--dtypes={','.join(opts.dtypes)}",
        f"--batch={batch}",
        *(f"--{name}={getattr(opts, name)}" for name in PEER_OPTIONS),
        f"--out={out}",
        *extra,
    ]
    print("peer:", " ".join(cmd), flush=True)
    if subprocess.run(cmd, check=False).returncode:
        print("peer benchmark failed (is torch + diffusers installed?)", flush=True)
        return None
    return report.load_result(out)


def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if FLAGS.compare:
        paths = list(FLAGS.compare) + list(argv[1:])
        if len(paths) != 2:
            raise SystemExit(f"--compare needs two result files, got {paths}")
        ours, peer = (report.load_result(p) for p in paths)
        print(report.format_comparison(ours, peer))
        return
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    from diffusion_jax.runtime import distributed
    from diffusion_jax.tools.benchmark import measure  # imports JAX

    distributed.maybe_initialize_distributed()
    opts = options.from_flags(FLAGS)
    opts = dataclasses.replace(opts, dtypes=opts.dtypes or (str(FLAGS.config.model.dtype),))
    result = measure.run_benchmark(FLAGS.config, opts, lambda s: print(s, flush=True))
    if FLAGS.out:
        report.write_result(result, FLAGS.out)
    print(report.format_table(result), flush=True)
    if FLAGS.peer:
        peer_out = (FLAGS.out or "benchmark.json").removesuffix(".json") + "_peer.json"
        batch = opts.batch or int(FLAGS.config.training.batch_size)
        peer = run_peer(opts, batch, peer_out, FLAGS.peer_args)
        if peer is not None:
            print(report.format_comparison(result, peer), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    paths.make_configs_importable()
    from absl import app

    define_flags()
    app.run(main)
