"""Compare diffusion_jax's FID Inception with pytorch-fid's on identical weights (optional tool).

Needs torch, torchvision and pytorch-fid (``pip install torch torchvision`` and
``pip install pytorch-fid --no-deps``); nothing in the package or its tests imports them.

Without ``--weights`` both networks get the same random weights (drawn in pytorch-fid's
state-dict layout, written to a torch file and read back through
``diffusion_jax.runtime.torch_pickle``); with ``--weights pt_inception-2015-12-05-6726825d.pth``
the real ones. The torch side is pytorch-fid's own ``InceptionV3`` (resize to 299, [0, 1]
-> [-1, 1], pool3) built by its ``fid_inception_v3`` and its FIDInceptionA/C/E blocks, plus
its ``fc`` layer for the logits. Prints the max abs / relative errors of pool3 and logits.

    python launch/check_inception_vs_pytorch_fid.py [--weights PATH] [--batch 4] [--size 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _import_pytorch_fid():
    """Import pytorch-fid; tolerate a torchvision whose compiled ops do not load (CPU torch
    with a CUDA torchvision wheel): only its pure-Python Inception layers are used here."""
    import torch
    import torch.library

    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: lambda f: f
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = register_fake
    from pytorch_fid import inception as pf

    return torch, pf


def _fid_skeleton_state_dict(pf) -> dict:
    """Keys and shapes of pytorch-fid's fid_inception_v3, without downloading weights."""
    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    return net.state_dict()


def _random_like(skeleton: dict, seed: int) -> dict:
    """He-scaled conv/fc weights and non-trivial BatchNorm statistics, in torch layout."""
    import torch

    rng = np.random.default_rng(seed)
    out = {}
    for key, tensor in skeleton.items():
        shape = tuple(tensor.shape)
        if key.endswith("num_batches_tracked"):
            value = np.array(0, np.int64)
        elif key.endswith("weight") and len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("bn.weight"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # biases, running means
            value = 0.1 * rng.standard_normal(shape)
        out[key] = torch.from_numpy(np.asarray(value).astype(tensor.numpy().dtype))
    return out


def _check_torch_pickle(torch, torch_sd: dict, directory: str) -> None:
    """torch.save (zip and legacy) -> torch_pickle, and tests' writer -> torch.load."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
    from torch_files import save_torch_state_dict

    from diffusion_jax.runtime.torch_pickle import load_torch_state_dict

    base = torch.arange(24.0).reshape(4, 6)
    extra = {
        "half": torch.randn(5).half(),
        "bf16": torch.randn(5).bfloat16(),
        "uint16": torch.tensor([1, 65535], dtype=torch.uint16),
        "base": base,
        "transposed": base.T,
        "sliced": base[1:, ::2],
        "param": torch.nn.Parameter(torch.randn(3)),
    }
    for legacy in (False, True):
        sd = {**torch_sd, **{k: v for k, v in extra.items() if not (legacy and k == "uint16")}}
        path = os.path.join(directory, f"torch_saved_{legacy}.pth")
        torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
        loaded = load_torch_state_dict(path)
        assert list(loaded) == list(sd)
        for key, tensor in sd.items():
            want = tensor.detach().float() if tensor.dtype == torch.bfloat16 else tensor.detach()
            got = loaded[key].astype(np.float32) if tensor.dtype == torch.bfloat16 else loaded[key]
            assert np.array_equal(got, want.numpy()), key
        arrays = {k: v for k, v in loaded.items() if k not in ("bf16", "uint16")}
        arrays["transposed"] = arrays["base"].T  # a view again, written as a strided view
        written = os.path.join(directory, f"written_{legacy}.pth")
        save_torch_state_dict(arrays, written, legacy=legacy)
        back = torch.load(written, weights_only=True)
        for key, array in arrays.items():
            assert np.array_equal(back[key].numpy(), array), key
        print(
            f"torch_pickle vs torch ({'legacy' if legacy else 'zip'} format): "
            f"{len(sd)} tensors read exactly, tests' writer read back by torch.load"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="", help="pytorch-fid .pth (default: random)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="input side before the resize")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch, pf = _import_pytorch_fid()
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from diffusion_jax.metrics.inception import load_inception_params, make_feature_fn

    skeleton = _fid_skeleton_state_dict(pf)
    if args.weights:
        weights_path = args.weights
        torch_sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    else:
        torch_sd = _random_like(skeleton, args.seed)
        weights_path = os.path.join(tempfile.mkdtemp(), "random_fid_inception.pth")
        torch.save(torch_sd, weights_path)
    _check_torch_pickle(torch, torch_sd, tempfile.mkdtemp())
    missing = set(skeleton) ^ set(torch_sd)
    assert not missing, f"key sets differ: {sorted(missing)[:10]}"
    print(
        f"pytorch-fid state dict: {len(skeleton)} keys "
        f"({sum(t.numel() for t in skeleton.values())} elements)"
    )

    # torch reference: pytorch-fid's own fid_inception_v3 + InceptionV3 wrapper.
    pf.load_state_dict_from_url = lambda *a, **k: torch_sd
    ref = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    fc = pf.fid_inception_v3().fc.eval()

    rng = np.random.default_rng(args.seed + 1)
    images = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        ref_pool = ref(x)[0][:, :, 0, 0]
        ref_logits = fc(ref_pool).numpy()
        ref_unbiased = (ref_pool @ fc.weight.T).numpy()
        ref_pool = ref_pool.numpy()

    params = load_inception_params(weights_path)  # through torch_pickle, no torch
    pool, unbiased = make_feature_fn(params)(images)
    _, logits = make_feature_fn(params, logits_bias=True)(images)

    def report(name: str, got: np.ndarray, want: np.ndarray) -> None:
        err = np.abs(got.astype(np.float64) - want.astype(np.float64))
        scale = np.abs(want).max()
        print(
            f"{name:16s} shape {got.shape}  max|ref| {scale:.4g}  max abs err {err.max():.3e}"
            f"  max rel err {err.max() / scale:.3e}"
        )

    print(
        f"batch {args.batch} of {args.size}x{args.size} uint8 images, resized to 299; "
        f"weights: {'file ' + args.weights if args.weights else 'random'}"
    )
    report("pool3", pool, ref_pool)
    report("logits (fc)", logits, ref_logits)
    report("logits unbiased", unbiased, ref_unbiased)


if __name__ == "__main__":
    main()
