"""`python -m diffusion_jax.tools.convert --source SRC (--out DIR | --workdir W --config
FILE)`: import released weights (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os

from diffusion_jax.runtime import errors, platforms
from diffusion_jax.tools.convert import from_diffusers, from_tf, imported, mapping

# ---------------------------------------------------------------------------------------
# Command line.


def detect_format(source: str | os.PathLike[str]) -> str:
    """Source format: `diffusers` for a folder holding config.json, `tf` for a TensorFlow
    checkpoint (a folder with a `checkpoint` file or `*.index`, or a `PREFIX.index` prefix).

    Raises FileNotFoundError naming the formats looked for when there is neither."""
    source = os.fspath(source)
    if os.path.isfile(os.path.join(source, "config.json")):
        return "diffusers"
    tf_dir = os.path.isdir(source) and any(
        f == "checkpoint" or f.endswith(".index") for f in os.listdir(source)
    )
    if tf_dir or os.path.isfile(source + ".index"):
        return "tf"
    what = "does not exist" if not os.path.exists(source) else "holds neither format"
    raise errors.InputError(
        f"--source {source} {what}; looked for a diffusers folder (config.json with "
        "diffusion_pytorch_model.safetensors or .bin) and a TensorFlow checkpoint (a folder "
        "with a 'checkpoint' file, or a PREFIX with PREFIX.index)"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m diffusion_jax.tools.convert", description=__doc__.split("\n")[0]
    )
    p.add_argument("--source", required=True, help="diffusers folder or TF checkpoint prefix/dir")
    p.add_argument("--out", default="", help="output folder (model_config.json + params)")
    p.add_argument("--workdir", default="", help="output workdir (config.json + checkpoints/0)")
    p.add_argument("--config", default="", help="with --workdir: experiment config file")
    p.add_argument("--format", default="auto", choices=("auto", "diffusers", "tf"))
    p.add_argument("--image_size", type=int, default=None, help="TF only: image size")
    p.add_argument("--num_groups", type=int, default=32, help="TF only: GroupNorm groups")
    p.add_argument("--scope", default="model", help="TF only: model variable scope")
    p.add_argument("--no_ema", action="store_true", help="TF only: raw instead of EMA weights")
    p.add_argument("--debug", action="store_true", help="show the traceback of input errors")
    args = p.parse_args(argv)
    if not (args.out or args.workdir):
        p.error("give --out DIR (imported weights) and/or --workdir DIR --config FILE")
    if args.workdir and not args.config:
        p.error("--workdir needs --config (e.g. configs/cifar10.py)")
    platforms.skip_tpu_off_tpu_vms()
    with errors.reported(args.debug):
        _convert(args)


def _convert(args: argparse.Namespace) -> None:
    fmt = detect_format(args.source) if args.format == "auto" else args.format
    if fmt == "diffusers":
        cfg, params = from_diffusers.convert_diffusers(args.source)
    else:
        cfg, params = from_tf.convert_tf(
            args.source,
            scope=args.scope,
            use_ema=not args.no_ema,
            image_size=args.image_size,
            num_groups=args.num_groups,
        )
    n = sum(int(v.size) for v in mapping.flatten_params(params).values())
    if args.out:
        imported.save_imported(args.out, cfg, params)
        print(f"converted {fmt} {args.source} -> {args.out}: {n:,} parameters")
    if args.workdir:
        imported.write_workdir(args.workdir, imported.load_config_file(args.config), cfg, params)
        print(
            f"converted {fmt} {args.source} -> workdir {args.workdir} (config.json, "
            f"checkpoints/0): {n:,} parameters; evaluate with\n  python -m diffusion_jax.main "
            f"--config {args.config} --workdir {args.workdir} --mode eval --config.eval.once=True"
        )
    print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
