"""The PyTorch peer of `python -m diffusion_jax.tools.benchmark`: diffusers' UNet2DModel as the DDPM
CIFAR-10 model, trained with Adam, timed the same way and written in the same JSON format.

The network is the configuration of launch/check_unet_vs_diffusers.py (35,746,307
parameters, the official CIFAR-10 U-Net) with dropout 0.1. A training step does what
`diffusion_jax.training.train_step` does: draw t and noise, L_simple, backward, global-norm
clipping at 1, Adam (lr 2e-4) and an EMA update of the parameters. Sampling runs the
ancestral DDPM chain (full, or respaced to --sample_steps steps, reported as such).

Optional tools, not package dependencies: torch and diffusers.

    python launch/benchmark_peer.py --batch 16 --only train,sample --sample_steps 20 \\
        --sample_images 16 --out peer.json
    python -m diffusion_jax.tools.benchmark --compare ours.json peer.json

On a shared machine whose load changes, --interleave alternates our train step and the
peer's step by step in this one process (both see the same load) and writes both results
(--ours_out, --out):

    python launch/benchmark_peer.py --interleave --batch 16 --repeats 8 \\
        --ours_out ours.json --out peer.json

--compile wraps the model in torch.compile (needs a working C++ toolchain on CPU);
bfloat16 runs under torch.autocast (parameters and optimiser stay float32). On CUDA, train
and sample rows record the most memory torch allocated during them (`memory.peak_bytes`).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.tools.benchmark import environment, report, timing  # noqa: E402 (no JAX import)
from launch.check_unet_vs_diffusers import CIFAR10, DDPM_COMMON, import_diffusers  # noqa: E402

T = 1000


def linear_alphas_cumprod(torch, device):
    """alphabar_t of the DDPM linear schedule (Ho et al. 2020, §4: beta from 1e-4 to 0.02),
    computed in float64."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).to(device=device, dtype=torch.float32)


class Peer:
    """The diffusers model, its optimiser and EMA, on one torch device."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.torch = torch
        self.args = args
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        self.model = import_diffusers()(**DDPM_COMMON, **CIFAR10, dropout=0.1).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in self.params)
        self.opt = torch.optim.Adam(self.params, lr=2e-4)
        self.ema = [p.detach().clone() for p in self.params]
        self.net = torch.compile(self.model) if args.compile else self.model
        self.alphas_cumprod = linear_alphas_cumprod(torch, self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def peak_memory(self) -> dict[str, int] | None:
        """{'peak_bytes': most CUDA memory allocated since the last call} (None on CPU)."""
        if self.device.type != "cuda":
            return None
        peak = self.torch.cuda.max_memory_allocated(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)
        return {"peak_bytes": int(peak)}

    def autocast(self, dtype: str):
        import contextlib

        if dtype == "float32":
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)

    def train_step(self, x0, dtype: str) -> None:
        torch = self.torch
        self.model.train()
        t = torch.randint(0, T, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise
        with self.autocast(dtype):
            eps = self.net(x_t, t).sample
        loss = torch.mean(torch.square(eps.float() - noise))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - 0.9999)

    def sample(self, n: int, steps: int, dtype: str):
        """Ancestral sampling over `steps` evenly spaced timesteps (all T when steps == T),
        fixed-large variance on the respaced chain, x0_hat clipped to [-1, 1]."""
        torch = self.torch
        self.model.eval()
        use = torch.linspace(0, T - 1, steps).round().long() if steps < T else torch.arange(T)
        ab = self.alphas_cumprod[use.to(self.device)]
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        betas = 1.0 - ab / ab_prev
        x = torch.randn(n, 3, 32, 32, device=self.device)
        with torch.inference_mode(), self.autocast(dtype):
            for i in range(steps - 1, -1, -1):
                t = torch.full((n,), int(use[i]), device=self.device)
                eps = self.net(x, t).sample.float()
                x0 = ((x - (1 - ab[i]).sqrt() * eps) / ab[i].sqrt()).clamp(-1, 1)
                coef0 = ab_prev[i].sqrt() * betas[i] / (1 - ab[i])
                coeft = (1 - betas[i]).sqrt() * (1 - ab_prev[i]) / (1 - ab[i])
                x = coef0 * x0 + coeft * x
                if i > 0:
                    x = x + betas[i].sqrt() * torch.randn_like(x)
        return x

    def forward_flops(self) -> float | None:
        """FLOPs of one forward pass per image by torch's FLOP counter (multiply-add = 2)."""
        torch = self.torch
        try:
            from torch.utils.flop_counter import FlopCounterMode
        except ImportError:
            return None
        x = torch.randn(1, 3, 32, 32, device=self.device)
        t = torch.zeros(1, dtype=torch.long, device=self.device)
        self.model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.model(x, t)
        return float(counter.get_total_flops())


def timed(peer: Peer, fn, warmup: int, repeats: int, per: int = 1) -> tuple[float, list[float]]:
    """Median seconds per call of fn() (synchronised), over `repeats` repeats of `per` calls."""
    for _ in range(warmup):
        fn()
    peer.sync()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        for _ in range(per):
            fn()
        peer.sync()
        times.append((time.perf_counter() - start) / per)
    return statistics.median(times), times


def is_oom(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


def bench_train(peer: Peer, args, dtype: str, batch: int, task: str) -> dict[str, Any]:
    torch = peer.torch
    x0 = torch.rand(batch, 3, 32, 32, device=peer.device) * 2 - 1
    step = lambda: peer.train_step(x0, dtype)
    peer.peak_memory()
    start = time.perf_counter()
    step()  # first call (torch.compile compiles here)
    peer.sync()
    first = time.perf_counter() - start
    iters = args.iters or max(1, math.ceil(1.0 / max(first, 1e-6)))
    seconds, times = timed(peer, step, max(args.warmup - 1, 0), args.repeats, iters)
    return timing.row(
        task,
        dtype,
        batch,
        seconds=seconds,
        seconds_all=times,
        images=batch,
        compile_s=round(first, 2) if args.compile else None,
        iters=iters,
        memory=peer.peak_memory(),
    )


def bench_forward(peer: Peer, args, dtype: str) -> dict[str, Any]:
    torch = peer.torch
    x = torch.rand(args.batch, 3, 32, 32, device=peer.device) * 2 - 1
    t = torch.arange(args.batch, device=peer.device)
    peer.model.eval()

    def run():
        with torch.inference_mode(), peer.autocast(dtype):
            peer.net(x, t)

    seconds, times = timed(peer, run, args.warmup, args.repeats)
    return timing.row(
        "forward", dtype, args.batch, seconds=seconds, seconds_all=times, images=args.batch
    )


def bench_sample(peer: Peer, args, dtype: str) -> dict[str, Any]:
    steps = args.sample_steps or T
    n = args.sample_images
    run = lambda: peer.sample(n, steps, dtype)
    peer.peak_memory()
    seconds, times = timed(peer, run, args.warmup, args.sample_repeats)
    note = "full chain" if steps == T else f"respaced chain of {steps} of {T} steps"
    if n < 256:
        note += f", {n} images (not 256)"
    if steps < T or n < 256:
        note += " (reduced; not extrapolated)"
    return timing.row(
        "sample",
        dtype,
        n,
        steps=steps,
        seconds=seconds,
        seconds_all=times,
        images=n,
        note=note,
        memory=peer.peak_memory(),
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch

    load_before = environment.host_info()["load_avg"]
    peer = Peer(args)
    results = []
    log = lambda r: print(report.format_row(r), flush=True)
    on_cpu = peer.device.type == "cpu"
    flops = peer.forward_flops()
    print(f"peer forward: {flops and flops / 1e9:.4g} GFLOP/image (torch FLOP counter)")
    for dtype in args.dtypes.split(","):
        if "forward" in args.only:
            results.append(bench_forward(peer, args, dtype))
            log(results[-1])
        if "train" in args.only:
            results.append(bench_train(peer, args, dtype, args.batch, "train"))
            log(results[-1])
            cap = args.max_batch or (0 if on_cpu else 65536)
            best, trial = None, args.batch * 2
            while trial <= cap:
                try:
                    peer.train_step(torch.zeros(trial, 3, 32, 32, device=peer.device), dtype)
                    peer.sync()
                except Exception as error:  # noqa: BLE001 - only OOM ends the search
                    if not is_oom(error):
                        raise
                    peer.opt.zero_grad(set_to_none=True)
                    if peer.device.type == "cuda":
                        torch.cuda.empty_cache()
                    break
                best, trial = trial, trial * 2
            if best:
                results.append(bench_train(peer, args, dtype, best, "train_max"))
                results[-1]["note"] = f"largest batch {args.batch} x 2^k that fit"
                log(results[-1])
        if "sample" in args.only:
            results.append(bench_sample(peer, args, dtype))
            log(results[-1])
    host = environment.host_info()
    host["load_avg_before"] = load_before
    kind = torch.cuda.get_device_name(peer.device) if peer.device.type == "cuda" else "cpu"
    return {
        "implementation": "pytorch-diffusers" + (" (torch.compile)" if args.compile else ""),
        "device": {
            "platform": peer.device.type,
            "kind": kind,
            "count": 1,
            "process_count": 1,
            "peak_tflops_per_device": None,
            "torch_threads": torch.get_num_threads(),
        },
        "host": host,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "model": {"name": "UNet2DModel", "num_params": peer.num_params, "dropout": 0.1},
        "options": vars(args),
        "checks": {"forward_gflop_per_image": {"float32": flops and flops / 1e9}},
        "results": results,
    }


def _alternate(steps: dict[str, Any], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each named blocking step, run alternately (who goes first alternates)."""
    for _ in range(max(warmup, 1)):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    order = list(steps)
    for i in range(max(repeats, 1)):
        for name in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _interleave_train(ours, peer: Peer, args, dtype: str) -> tuple[dict[str, list[float]], Any]:
    """Times of alternating train steps {'ours': [...], 'peer': [...]}, our compiled step."""
    import jax

    compiled, data, _ = ours.compile_train(dtype, args.batch)
    holder = {"state": ours.state()}

    def ours_step():
        holder["state"], metrics = compiled(holder["state"], data)
        jax.block_until_ready((holder["state"], metrics))
        ours._state = holder["state"]

    x0 = peer.torch.rand(args.batch, 3, 32, 32, device=peer.device) * 2 - 1

    def peer_step():
        peer.train_step(x0, dtype)
        peer.sync()

    times = _alternate({"ours": ours_step, "peer": peer_step}, args.warmup, args.repeats)
    return times, compiled


def interleaved(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train steps of diffusion_jax and of the peer alternately in this one process, so that
    both see the same machine load (a shared CPU); returns (ours, peer) results."""
    import diffusers
    import torch

    from configs.cifar10 import get_config
    from diffusion_jax.tools.benchmark.measure import Benchmark
    from diffusion_jax.tools.benchmark.options import Options

    load_before = environment.host_info()["load_avg"]
    opts = Options(batch=args.batch, repeats=args.repeats, init="model")
    ours = Benchmark(get_config(), opts, log=lambda s: print(s, flush=True))
    peer = Peer(args)
    peer_rows = []
    for dtype in args.dtypes.split(","):
        times, compiled = _interleave_train(ours, peer, args, dtype)
        flops = {"ours": timing.compiled_flops(compiled), "peer": None}
        memory = {"ours": timing.compiled_memory(compiled), "peer": peer.peak_memory()}
        for name, rows in (("ours", ours.results), ("peer", peer_rows)):
            t = times[name]
            rows.append(
                timing.row(
                    "train",
                    dtype,
                    args.batch,
                    seconds=statistics.median(t),
                    seconds_all=t,
                    images=args.batch,
                    flops=flops[name],
                    peak=ours.peak if name == "ours" else None,
                    note="interleaved step by step with the other implementation",
                    iters=1,
                    seconds_min=min(t),
                    memory=memory[name],
                )
            )
            print(f"{name}: {report.format_row(rows[-1])}", flush=True)
    ours_result = ours.envelope(load_before)
    ours_result["implementation"] += " (interleaved)"
    host = environment.host_info()
    host["load_avg_before"] = load_before
    kind = torch.cuda.get_device_name(peer.device) if peer.device.type == "cuda" else "cpu"
    peer_result = {
        "implementation": "pytorch-diffusers (interleaved)",
        "device": {"platform": peer.device.type, "kind": kind, "count": 1},
        "host": host,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "model": {"name": "UNet2DModel", "num_params": peer.num_params, "dropout": 0.1},
        "options": vars(args),
        "results": peer_rows,
    }
    return ours_result, peer_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="train,sample", help="train,sample,forward")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--max_batch", type=int, default=0, help="search cap; 0: auto (off on CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=0, help="steps per repeat; 0: about 1 s")
    p.add_argument("--sample_images", type=int, default=256)
    p.add_argument("--sample_steps", type=int, default=0, help="0: the full chain")
    p.add_argument("--sample_repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default="")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="train only: alternate diffusion_jax and peer steps in one process (same load)",
    )
    p.add_argument("--ours_out", default="", help="with --interleave: our result file")
    args = p.parse_args()
    if args.interleave:
        ours, peer = interleaved(args)
        if args.ours_out:
            report.write_result(ours, args.ours_out)
        if args.out:
            report.write_result(peer, args.out)
        print(report.format_comparison(ours, peer), flush=True)
        return
    result = run(args)
    if args.out:
        report.write_result(result, args.out)
    print(report.format_table(result), flush=True)


if __name__ == "__main__":
    main()
