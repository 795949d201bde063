"""Equivalence proof: our DDPM U-Net vs diffusers' UNet2DModel (the port of the official model).

Builds diffusers' UNet2DModel configured as google/ddpm-cifar10-32 (and, unless
--skip_256, as google/ddpm-celebahq-256), with seeded random weights (norm affine
parameters and biases perturbed too, so that every mapping matters), saves it with
`save_pretrained` to a temporary folder, imports it with `diffusion_jax.tools.convert`, runs both
networks on the same random x_t and t, and prints the max abs error (target <= 1e-4,
float32). The 32x32 model is also checked through the legacy attention names and the
`.bin` (torch pickle) path.

Optional tools, not package dependencies: torch (CPU) and diffusers.

    python launch/check_unet_vs_diffusers.py [--batch 4] [--skip_256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOL = 1e-4

CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
CELEBAHQ256 = dict(
    sample_size=256,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)
DDPM_COMMON = dict(
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    time_embedding_type="positional",
)


def import_diffusers():
    """Import UNet2DModel; a torchvision that does not match torch is hidden from diffusers."""
    import diffusers.utils.import_utils as iu

    iu._torchvision_available = False
    from diffusers import UNet2DModel

    return UNet2DModel


def make_torch_model(cfg: dict, seed: int):
    import torch

    torch.manual_seed(seed)
    model = import_diffusers()(**DDPM_COMMON, **cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # biases and norm affines: move them off their 0 / 1 init
                module, leaf = name.rsplit(".", 1)
                base = 1.0 if "norm" in module.rsplit(".", 1)[-1] and leaf == "weight" else 0.0
                p.copy_(base + 0.1 * torch.randn_like(p))
    return model


def run_torch(model, x_nhwc: np.ndarray, t: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def run_jax(folder: str, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    import jax
    from flax import nnx

    from diffusion_jax.tools.convert import from_diffusers, imported

    cfg, params = from_diffusers.convert_diffusers(folder)
    with tempfile.TemporaryDirectory() as d:  # through our on-disk format as well
        imported.save_imported(d, cfg, params)
        cfg, params = imported.load_imported(d)
    model = imported.build_imported_model(cfg, params)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x, t: nnx.merge(graphdef, s)(x, t))
    return np.asarray(fwd(state, x, t.astype(np.int32)))


def check(name: str, cfg: dict, batch: int, seed: int, variants: bool) -> float:
    import torch

    rng = np.random.default_rng(seed)
    size = cfg["sample_size"]
    x = rng.standard_normal((batch, size, size, cfg["in_channels"])).astype(np.float32)
    t = rng.integers(0, 1000, size=(batch,)).astype(np.int64)
    model = make_torch_model(cfg, seed)
    n_params = sum(p.numel() for p in model.parameters())
    ref = run_torch(model, x, t)
    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        out = run_jax(d, x, t)
        err = float(np.abs(out - ref).max())
        worst = max(worst, err)
        print(
            f"{name}: {n_params:,} params, batch {batch}, |ref|max {np.abs(ref).max():.3f}, "
            f"max abs err (safetensors) = {err:.3e}",
            flush=True,
        )
        if variants:
            from safetensors.numpy import load_file

            state = load_file(os.path.join(d, "diffusion_pytorch_model.safetensors"))
            os.remove(os.path.join(d, "diffusion_pytorch_model.safetensors"))
            legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
            renamed = {}
            for k, v in state.items():
                for new, old in legacy.items():
                    k = k.replace(f".{new}.", f".{old}.")
                renamed[k] = torch.from_numpy(v)
            torch.save(renamed, os.path.join(d, "diffusion_pytorch_model.bin"))
            err = float(np.abs(run_jax(d, x, t) - ref).max())
            worst = max(worst, err)
            print(f"{name}: max abs err (.bin, legacy attention names) = {err:.3e}", flush=True)
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_256", action="store_true")
    args = p.parse_args()
    errs = {"cifar10_32": check("cifar10_32", CIFAR10, args.batch, args.seed, variants=True)}
    if not args.skip_256:
        errs["celebahq_256"] = check("celebahq_256", CELEBAHQ256, 1, args.seed + 1, variants=False)
    ok = all(e <= TOL for e in errs.values())
    print(f"{'PASS' if ok else 'FAIL'} (tolerance {TOL:g}): {errs}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
