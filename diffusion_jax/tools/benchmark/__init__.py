"""Throughput benchmark: training, sampling, bits/dim evaluation and Inception features.

    python -m diffusion_jax.tools.benchmark [--config configs/cifar10.py] [--only train,sample]
        [--batch 128] [--dtypes float32,bfloat16] [--repeats 5] [--sample_steps 1000]
        [--sample_images 256] [--out result.json] [--peer]
    python -m diffusion_jax.tools.benchmark --compare ours.json peer.json

    # a few minutes on a 2-core CPU:
    python -m diffusion_jax.tools.benchmark --only train,sample --batch 16 --sample_steps 20 \\
        --sample_images 16 --repeats 3 --iters 1 --out ours.json

Measures on whatever devices JAX sees, through the code the training and evaluation jobs run;
results go to `--out` as JSON and are printed as a table. `launch/benchmark_peer.py` writes
the same format for the PyTorch peer, `--compare` prints two results side by side and
`--peer` runs the peer right after us and compares. The modules:

* `options`: `Options`, what to measure (each field is also a command-line flag);
* `tasks`: the measurements (`Benchmark`, `run_benchmark`; imports JAX), described there;
* `environment`: host, devices, package versions, the peak per device kind
  (`diffusion_jax.tools.xla_analysis.CHIPS`, shared with `aot`);
* `timing`: medians, XLA's FLOP and memory analyses (`xla_analysis`), donation, the result
  `row`;
* `report`: the table, the comparison, result files;
* `__main__`: the command line.

Importing this package, `options`, `environment`, `timing` or `report` imports neither JAX
nor TensorFlow (the PyTorch peer uses them).
"""

from diffusion_jax.tools.benchmark.environment import (
    host_info,
    jax_device_info,
    package_versions,
    peak_tflops,
)
from diffusion_jax.tools.benchmark.options import EXTRA_TASKS, TASKS, Options
from diffusion_jax.tools.benchmark.report import (
    REFERENCE_FORWARD_GFLOP,
    format_comparison,
    format_row,
    format_table,
    load_result,
    write_result,
)
from diffusion_jax.tools.benchmark.timing import (
    compiled_flops,
    compiled_memory,
    donated_aliases,
    is_oom,
    median_time,
    row,
)

__all__ = [
    "EXTRA_TASKS",
    "REFERENCE_FORWARD_GFLOP",
    "TASKS",
    "Options",
    "compiled_flops",
    "compiled_memory",
    "donated_aliases",
    "format_comparison",
    "format_row",
    "format_table",
    "host_info",
    "is_oom",
    "jax_device_info",
    "load_result",
    "median_time",
    "package_versions",
    "peak_tflops",
    "row",
    "write_result",
]
