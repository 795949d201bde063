"""diffusion_jax.tools.benchmark: the harness on a tiny U-Net, the table and comparison printers."""

import copy
import json
import subprocess
import sys
import time

import jax
import pytest

from configs.cifar10 import get_config
from diffusion_jax.runtime import distributed
from diffusion_jax.tools import benchmark as bench
from diffusion_jax.tools.benchmark import measure
from diffusion_jax.training import state as state_lib


def _tiny_config():
    config = get_config()
    config.data.image_size = 8
    config.model.ch = 8
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.num_groups = 4
    config.model.dropout = 0.0
    return config


def test_peak_table():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert bench.peak_tflops("TPU v4") == 275.0
    assert bench.peak_tflops("TPU v5 lite") == 197.0
    assert bench.peak_tflops("TPU v3") == pytest.approx(61.5)  # 123 per chip, 2 cores
    assert bench.peak_tflops("TPU v5") == 459.0  # v5p
    assert bench.peak_tflops("TPU v6 lite") == 918.0
    assert bench.peak_tflops("cpu") is None
    assert bench.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 2.0GiB"))
    assert not bench.is_oom(ValueError("incompatible shapes"))


def test_reports_import_without_jax():
    """launch/benchmark_peer.py (PyTorch) uses the package, its options, timing and report."""
    modules = [
        "diffusion_jax.tools.benchmark." + m for m in ("options", "environment", "timing", "report")
    ]
    code = (
        f"import sys, {', '.join(modules)}; "
        "assert 'jax' not in sys.modules and 'tensorflow' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_options_are_the_flags():
    """Every `Options` field is a flag of the same name and default, parsed back into it."""
    from absl import flags

    from diffusion_jax.tools.benchmark import options

    values = flags.FlagValues()
    options.define_flags(values)
    values(["prog"])
    assert options.from_flags(values) == bench.Options()
    values(["prog", "--only=train,bpd", "--batch=32", "--init=host", "--noforward_flops"])
    assert options.from_flags(values) == bench.Options(
        only=("train", "bpd"), batch=32, init="host", forward_flops=False
    )
    with pytest.raises(flags.IllegalFlagValueError):
        values["init"].parse("device")


def _tiny_options(**changes) -> bench.Options:
    """float32, batch 8, 2-step chains of 8 images, no warmup: seconds per task."""
    tiny = dict(dtypes=("float32",), batch=8, warmup=0, sample_images=8, sample_steps=2)
    tiny.update(sample_repeats=1, bpd_batch=8, bpd_timesteps=2, init="host")
    return bench.Options(**{**tiny, **changes})


def test_harness_forward_programs_on_eight_devices(devices):
    """On 8 devices the train state splits the parameters (ZeRO-1); the forward, sampling
    and bits/dim programs take them whole (`Benchmark.params`) and run."""
    opts = _tiny_options(only=("forward", "sample", "bpd"), num_devices=8, forward_flops=False)
    result = measure.run_benchmark(_tiny_config(), opts, log=lambda _: None)
    assert result["device"]["count"] == 8
    assert {r["task"] for r in result["results"]} == {"forward", "sample", "bpd"}


def test_harness_on_a_tiny_unet(tmp_path):
    opts = _tiny_options(
        only=("train", "sample", "bpd"),
        repeats=2,
        iters=1,
        num_devices=1,  # the 8-device SPMD compile is 2x slower; same code path otherwise
        profile=str(tmp_path / "trace"),
    )
    lines = []
    result = measure.run_benchmark(_tiny_config(), opts, log=lines.append)
    path = tmp_path / "ours.json"
    bench.write_result(result, path)
    result = json.loads(path.read_text())

    assert result["implementation"] == "diffusion_jax"
    assert result["device"]["count"] == 1
    assert result["device"]["platform"] == "cpu"
    assert result["device"]["peak_tflops_per_device"] is None
    assert set(result["versions"]) >= {"jax", "flax"}
    assert len(result["host"]["load_avg"]) == 3
    assert result["checks"]["forward_gflop_per_image"]["float32"] > 0
    assert "forward_vs_reference" not in result["checks"]  # not the CIFAR-10 model
    assert result["compiler_options"] == distributed.CPU_COMPILER_OPTIONS

    rows = {r["task"]: r for r in result["results"]}
    assert set(rows) == {"train", "sample", "bpd"}
    for r in rows.values():
        assert r["dtype"] == "float32" and r["batch"] == 8
        assert r["seconds"] > 0 and r["images_per_s"] > 0 and r["flops"] > 0
        assert r["mfu"] is None  # no known peak on CPU
        assert len(r["seconds_all"]) >= 1
    train = rows["train"]
    assert len(train["seconds_all"]) == 2
    leaves = int(train["donated"].split("/")[1])
    assert train["donated"] == f"{leaves}/{leaves}"  # every state buffer aliased
    assert train["dispatch_s_per_step"] < train["seconds"] * 5
    assert list((tmp_path / "trace" / "train_float32_batch8").rglob("*.trace.json.gz"))

    # XLA's memory analysis against the byte count of what the step takes and gives back:
    # the whole train state plus the batch in, the state (donated: aliased) plus metrics out.
    state = jax.eval_shape(lambda: state_lib.init_train_state(_tiny_config())[2])
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    batch_bytes = 8 * 8 * 8 * 3 * 4  # float32 images [1, 8, 8, 8, 3]; jit drops the unused labels
    memory = train["memory"]
    assert memory["argument_bytes"] == state_bytes + batch_bytes
    assert memory["alias_bytes"] == state_bytes
    outputs = len(jax.tree.leaves(state)) + 5  # the state and 5 float32 scalar metrics
    # XLA:CPU's result is a tuple buffer holding an 8-byte pointer per output
    assert memory["output_bytes"] == state_bytes + 5 * 4 + 8 * outputs
    assert memory["temp_bytes"] > 0
    assert memory["peak_bytes"] == (
        memory["argument_bytes"]
        + memory["output_bytes"]
        - state_bytes
        + memory["temp_bytes"]
        + memory["code_bytes"]
    )
    assert rows["sample"]["memory"]["temp_bytes"] > 0 and rows["bpd"]["memory"]["peak_bytes"] > 0
    assert rows["sample"]["steps"] == 2 and "reduced" in rows["sample"]["note"]
    assert rows["bpd"]["steps"] == 2
    table = bench.format_table(result)
    assert "train" in table and "n/a" in table

    peer = copy.deepcopy(result)
    peer["implementation"] = "pytorch-diffusers"
    peer["versions"] = {"torch": "2.x", "diffusers": "0.x"}
    for r in peer["results"]:
        r["images_per_s"] /= 2
    peer["results"] = [r for r in peer["results"] if r["task"] != "bpd"]
    text = bench.format_comparison(result, peer)
    assert "2.00x" in text and "pytorch-diffusers" in text
    assert "ours only: bpd" in text


def test_comparison_of_two_result_files(tmp_path):
    def result(name, speed):
        r = bench.row("train", "float32", 16, seconds=16 / speed, seconds_all=[1.0], images=16)
        s = bench.row("sample", "float32", 16, steps=20, seconds=4.0, seconds_all=[4.0], images=16)
        return {
            "implementation": name,
            "device": {"platform": "cpu", "kind": "cpu", "count": 1},
            "host": {"cpu_count": 2, "load_avg": [0.5, 0.5, 0.5], "date": "2026-11-23"},
            "versions": {},
            "results": [r, s],
        }

    bench.write_result(result("diffusion_jax", 6.0), tmp_path / "a.json")
    bench.write_result(result("pytorch-diffusers", 4.0), tmp_path / "b.json")
    text = bench.format_comparison(
        bench.load_result(tmp_path / "a.json"), bench.load_result(tmp_path / "b.json")
    )
    lines = text.splitlines()
    assert any(line.startswith("train") and line.endswith("1.50x") for line in lines)
    assert any(line.startswith("sample") and line.endswith("1.00x") for line in lines)
    assert "peak n/a" in text


def test_input_task_measures_the_pipeline(tmp_path, monkeypatch):
    """A pipeline slowed to `delay` s per batch is measured at just under batch / delay
    images/s; a dataset that is not prepared is reported, not raised."""
    from configs.digits import get_config as digits_config
    from diffusion_jax import input_pipeline

    delay = 0.02
    make_iterator = input_pipeline.create_train_iterator

    def slow_iterator(*args, **kwargs):
        for batch in make_iterator(*args, **kwargs):
            time.sleep(delay)
            yield batch

    monkeypatch.setattr(input_pipeline, "create_train_iterator", slow_iterator)
    opts = bench.Options(only=("input",), batch=16, repeats=3, iters=5, num_devices=1)
    result = measure.run_benchmark(digits_config(), opts, log=lambda s: None)
    (row,) = result["results"]
    assert row["task"] == "input" and row["batch"] == 16 and row["iters"] == 5
    assert 0.5 * 16 / delay < row["images_per_s"] <= 16 / delay
    assert row["note"].startswith("digits 8px")

    config = get_config()
    config.data.data_dir = str(tmp_path)
    lines = []
    result = measure.run_benchmark(config, opts, log=lines.append)
    assert result["results"] == []
    assert "--prepare cifar10" in result["checks"]["input_unavailable"]
    assert any(line.startswith("input: skipped") for line in lines)


def test_checkpoint_task_saves_the_whole_train_state(tmp_path, monkeypatch):
    import jax

    from diffusion_jax.training import checkpoint

    saved = []
    save = checkpoint.save

    def recording_save(mngr, step, state, **kwargs):
        saved.append(state)
        return save(mngr, step, state, **kwargs)

    monkeypatch.setattr(checkpoint, "save", recording_save)
    config = _tiny_config()
    opts = bench.Options(
        only=("checkpoint",), warmup=0, repeats=2, init="host", checkpoint_dir=str(tmp_path)
    )
    result = measure.run_benchmark(config, opts, log=lambda s: None)
    (row,) = result["results"]
    _, _, state, _ = state_lib.init_train_state(config)
    assert len(saved) == 2
    assert jax.tree.structure(saved[0]) == jax.tree.structure(state)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    # params, EMA and Adam's two moments in float32, plus a few scalars
    assert row["megabytes"] == pytest.approx(4 * 4 * num_params / 2**20, rel=0.02, abs=0.05)
    assert 0 < row["seconds"] <= row["written_s"]
    assert len(row["seconds_all"]) == len(row["written_s_all"]) == 2
    assert row["images_per_s"] is None
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone


def test_inception_task_on_grey_data():
    """Grey datasets are fed to Inception as RGB, as the evaluation tiles them."""
    from configs.digits import get_config as digits_config

    opts = bench.Options(
        only=("inception",), inception_batch=8, inception_size=75, repeats=1, num_devices=1
    )
    (row,) = measure.run_benchmark(digits_config(), opts, log=lambda s: None)["results"]
    assert row["task"] == "inception" and row["batch"] == 8 and row["images_per_s"] > 0
    assert row["flops"] > 0 and row["memory"]["temp_bytes"] > 0
