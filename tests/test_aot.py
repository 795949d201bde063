"""`diffusion_jax.tools.aot`: the run's own programs compiled by the TPU compiler for TPU slices
on this (CPU) host, and what the command reports of them.

The compiling tests need libtpu (`pip install -e ".[test]"` installs it on Linux x86-64)
and are skipped with that reason elsewhere; the parsing and error tests run everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config
from flax import nnx

from configs import digits_consistency, digits_distill
from diffusion_jax.runtime import errors
from diffusion_jax.tools import aot, xla_analysis
from diffusion_jax.training import state as state_lib

try:
    import libtpu  # noqa: F401

    HAVE_LIBTPU = True
except ImportError:
    HAVE_LIBTPU = False
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU,
    reason='libtpu is not installed (the ".[test]" extra installs it on Linux x86-64 only)',
)

KEYS = {
    "program",
    "topology",
    "devices",
    "argument_bytes",
    "temp_bytes",
    "output_bytes",
    "hbm_bytes",
    "fits",
    "flops",
    "bytes_accessed",
    "loop_counting",
    "estimated_seconds",
    "per_second",
    "compile_seconds",
}
PROGRAMS = ("train", "sample", "bpd")


def _config(batch: int, config=None):
    """The tiny U-Net (one resolution) at `batch` for every program: compiles in seconds;
    `config`: another digits config to shrink so (a distillation's)."""
    config = tiny_config() if config is None else config
    config.model.ch, config.model.num_groups = 8, 4
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = (8,)
    config.training.batch_size = config.sampling.batch_size = batch
    for name in ("bpd", "ode_bpd", "fid"):
        config.evals[name].batch_size = batch
    # the replicated train state, whose collectives and bytes do not depend on the device
    # count; ZeRO-1 has its own tests below
    config.training.shard_optimizer = False
    return config


@pytest.fixture(scope="module")
def v3_8(tmp_path_factory):
    """Rows of the command for a v3-8 (8 devices, 1 host) at 2 images per device."""
    path = tmp_path_factory.mktemp("aot") / "rows.json"
    aot.run(_config(16), "v3:2x2", PROGRAMS, json_path=str(path), log=lambda _: None)
    return {r["program"]: r for r in json.loads(path.read_text())}


@needs_libtpu
@pytest.mark.slow
def test_rows_for_a_v3_8_have_the_documented_keys_and_the_cpu_flops(v3_8, devices):
    for name in PROGRAMS:
        row = v3_8[name]
        assert KEYS <= set(row), KEYS - set(row)
        assert (row["topology"], row["devices"], row["fits"]) == ("v3:2x2", 8, True)
        assert row["hbm_bytes"] == 16 * 2**30
        for key in ("argument_bytes", "temp_bytes", "output_bytes", "flops", "bytes_accessed"):
            assert row[key] > 0, (name, key)
        assert 0 < row["estimated_seconds"] < 10 and row["compile_seconds"] > 0
        assert row["per_second"] == pytest.approx(row["units_per_call"] / row["estimated_seconds"])
    # The chain sampler and bits/dim scan the 1000 timesteps; training is one step.
    assert [v3_8[name]["loop_factor"] for name in PROGRAMS] == [1, 1000, 1000]
    # the sampler's rest counted once (its unrolled twin), the others by the factor
    assert [v3_8[name]["loop_counting"] for name in PROGRAMS] == ["factor", "twin", "factor"]

    # The same programs, compiled by XLA:CPU for 8 simulated devices at the same batch:
    # the TPU compiler counts the same FLOPs per device (within 10%).
    cpu = aot.Topology("cpu", "cpu", tuple(devices), 2**40, 1.0)
    for program in aot.build_programs(_config(16), cpu, PROGRAMS):
        compiled = program.fn.lower(*program.args).compile()
        flops = xla_analysis.cost(compiled)["flops"] * xla_analysis.loop_factor(compiled.as_text())
        assert v3_8[program.name]["flops"] == pytest.approx(flops, rel=0.10), program.name


@needs_libtpu
@pytest.mark.slow
def test_a_v3_32_of_four_hosts_runs_the_v3_8_program_only_wider(v3_8):
    """v3:4x4 (32 devices on 4 hosts) at the same 2 images per device: the same FLOPs,
    memory and collectives per device as on one host, the gradient all-reduce now crossing
    hosts."""
    rows = aot.run(_config(64), "v3:4x4", PROGRAMS, log=lambda _: None)
    for row in rows:
        one_host = v3_8[row["program"]]
        assert (row["devices"], row["processes"], row["fits"]) == (32, 4, True)
        assert row["flops"] == pytest.approx(one_host["flops"], rel=0.02), row["program"]
        assert row["argument_bytes"] == one_host["argument_bytes"], row["program"]
        ours, theirs = row["collectives"], one_host["collectives"]
        assert ours["ops"] == theirs["ops"], row["program"]
        assert theirs["cross_host_count"] == 0
        assert ours["cross_host_count"] == ours["count"]
    train = next(r for r in rows if r["program"] == "train")
    # One all-reduce per step, of about every parameter's float32 gradient (the partitioner
    # may reduce a few intermediates instead of the gradients they determine).
    shapes = jax.eval_shape(lambda: state_lib.init_train_state(_config(64))[2].params)
    params = sum(4 * x.size for x in jax.tree.leaves(shapes))
    assert train["collectives"]["ops"] == {"all-reduce": 1}
    assert train["collectives"]["cross_host_bytes"] == pytest.approx(params, rel=0.05)


def _preview_config(task: str):
    """Previews of 8 samples every 3 steps: a 10-step respaced chain, or for a distillation
    (16 -> 4 steps, 2 updates a round, an eps teacher: round 0 fine-tunes) DDIM with round
    1's student, 8 steps, at step 3, or for a consistency distillation with an EMA target
    2-step consistency sampling (8 steps of the time grid here)."""
    base = {"distill": digits_distill, "consistency": digits_consistency}.get(task)
    config = _config(16, base.get_config() if base else None)
    config.training.sample_every, config.training.steps_per_call = 3, 1
    config.sampling.preview_num, config.sampling.preview_respacing = 8, "10"
    if task == "distill":
        config.distill.teacher_workdir = "/nonexistent/teacher"  # aot loads no teacher
        config.distill.start_steps, config.distill.end_steps = 16, 4
        config.distill.steps_per_round = 2
    if task == "consistency":
        config.consistency.method = "distillation"  # with its teacher in the state
        config.consistency.teacher_workdir = "/nonexistent/teacher"
        config.consistency.target_decay = 0.99
        config.training.num_train_steps = 6
        config.sampling.num_steps = 8
    return config


def test_a_consistency_update_compiles_with_its_teacher_and_target(devices):
    """`--mode consistency`'s update (`consistency_step.consistency_step`), as aot builds it
    from the task: its state carries the frozen teacher and the EMA target, and its FLOPs are
    a train step's and more (the teacher's and the target's forward passes)."""
    cpu = aot.Topology("cpu", "cpu", tuple(devices), 2**40, 1.0)
    config = _preview_config("consistency")
    (program,) = aot.build_programs(config, cpu, ("train",))
    state, metrics = program.fn.eval_shape(*program.args)
    assert isinstance(state, state_lib.ConsistencyState) and "stage" in metrics
    plain = _preview_config("train")
    (train,) = aot.build_programs(plain, cpu, ("train",))
    flops = lambda p: p.fn.lower(*p.args).compile().cost_analysis()["flops"]
    assert flops(program) > 1.3 * flops(train)


@pytest.mark.parametrize("task", ["train", "distill", "consistency"])
def test_the_preview_row_counts_the_train_state_resident_while_it_runs(devices, task):
    """The preview sampler compiled as the run builds it (at `preview_num`, for a
    distillation with the round's student steps) and, added to its own peak, the train state
    that stays on the devices: every array of the state but the EMA parameters (its
    argument), i.e. params, mu and nu (+ the teacher, + a consistency run's target) of the
    parameters' size. So `fits` turns false on a device that holds the sampler alone but not
    beside the state."""
    config = _preview_config(task)
    shapes = jax.eval_shape(lambda: state_lib.init_train_state(config)[2])
    nbytes = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    params, ema = nbytes(shapes.params), nbytes(shapes.ema_params)
    resident = nbytes(shapes) - ema  # replicated: each device holds all of it
    copies = {"train": 3, "distill": 4, "consistency": 5}[task]
    assert resident // params == copies and resident % params < 64  # + step and counters

    cpu = aot.Topology("cpu", "cpu", tuple(devices), 2**40, 1.0)
    (program,) = aot.build_programs(config, cpu, ("preview",))
    assert program.fn.eval_shape(*program.args)["sample"].shape == (8, 8, 8, 1)
    compiled = program.fn.lower(*program.args).compile()
    mem = compiled.memory_analysis()
    own = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    assert ema <= mem.argument_size_in_bytes < ema + 64  # the EMA parameters, key, labels
    # The sampler's steps: all its network calls run in the scan over them.
    assert xla_analysis.loop_factor(compiled.as_text()) == (10 if task == "train" else 8)

    tight = dataclasses.replace(cpu, hbm_bytes=own + resident // 2)
    row = aot.analyse(program, tight)
    assert row["resident_bytes"] == resident
    assert row["peak_bytes"] == own + resident
    assert not row["fits"]  # the sampler alone (own) would fit

    # ZeRO-1: the argument is a gathered copy of the EMA, and the split state stays resident
    config.training.shard_optimizer = True
    (split,) = aot.build_programs(config, cpu, ("preview",))
    placed = state_lib.abstract_train_state(config, cpu.mesh(), training=True)[2]
    assert split.resident == aot.device_bytes(placed) < resident


@needs_libtpu
@pytest.mark.slow
def test_zero1_on_a_v3_8_splits_the_state_and_gathers_the_parameters():
    """The train step compiled by the TPU compiler with the parameters, the Adam moments and
    the EMA split over 8 devices: the same FLOPs, fewer argument bytes per device than
    replicated, and the parameters all-gathered (the gradients are still all-reduced: the
    compiler does not turn the all-reduce and the slice after it into a reduce-scatter). The
    kernels are gathered in bfloat16, which is all the convolutions read of them (with
    `model.dtype=bfloat16`, and in float32 at the TPU's default precision, one bfloat16 pass),
    and every gradient is still summed in float32."""
    rows = {}
    for split, dtype in ((False, "float32"), (True, "float32"), (True, "bfloat16")):
        config = _config(16)
        config.model.ch, config.model.num_groups = 16, 4  # every big axis divisible by 8
        config.training.shard_optimizer = split
        config.model.dtype = dtype
        (rows[split, dtype],) = aot.run(config, "v3:2x2", ("train",), log=lambda _: None)
    replicated, split, mixed = rows.values()
    assert split["flops"] == pytest.approx(replicated["flops"], rel=0.05)
    assert split["argument_bytes"] < 0.3 * replicated["argument_bytes"]
    assert replicated["collectives"]["ops"] == {"all-reduce": 1}
    model = state_lib.abstract_model(config)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    for row in (split, mixed):
        assert row["collectives"]["ops"].get("all-gather", 0) > 0
        dtypes = row["collectives"]["dtypes"]
        assert dtypes["f32"] >= 4 * n, dtypes  # the gradients
        assert 0 < dtypes["bf16"] <= 2 * n, dtypes  # the kernels, gathered


@needs_libtpu
@pytest.mark.slow
def test_bfloat16_model_all_reduces_float32_gradients():
    """`model.dtype=bfloat16` on a v3-8: every gradient the TPU compiler all-reduces over
    the devices is float32 (convolutions, dense layers, GroupNorm and the class embedding);
    flax's own bfloat16 layers all-reduce bfloat16 gradients."""
    config = _config(16)
    config.model.ch, config.model.num_groups = 16, 4
    config.model.num_classes = 3
    config.model.dtype = "bfloat16"
    (row,) = aot.run(config, "v3:2x2", ("train",), log=lambda _: None)
    assert set(row["collectives"]["dtypes"]) == {"f32"}, row["collectives"]


def test_no_preview_without_previews(devices):
    config = _preview_config(False)
    config.training.sample_every = 0
    cpu = aot.Topology("cpu", "cpu", tuple(devices), 2**40, 1.0)
    assert aot.build_programs(config, cpu, ("preview",)) == []


@needs_libtpu
def test_a_program_that_does_not_fit_ends_in_one_line_naming_it(monkeypatch):
    real = aot.get_topology

    def tiny_hbm(name):
        topo = real(name)
        return aot.Topology(topo.name, topo.topology, topo.devices, 1024, topo.peak_flops)

    monkeypatch.setattr(aot, "get_topology", tiny_hbm)
    with pytest.raises(
        errors.UserError,
        match=r"^sample does not fit v3:2x2: .* GiB per device .* largest buffers: ",
    ):
        aot.run(_config(16), "v3:2x2", ("sample",), log=lambda _: None)


@needs_libtpu
@pytest.mark.slow
def test_a_program_the_compiler_cannot_fit_ends_in_one_line_naming_it():
    config = _config(16)
    config.training.batch_size = 2**23  # about 240 GiB of temporaries per device
    with pytest.raises(errors.UserError, match=r"^train does not fit v3:2x2 .*Largest arrays"):
        aot.run(config, "v3:2x2", ("train",), log=lambda _: None)


def test_unknown_topology_and_missing_libtpu_are_user_errors(monkeypatch):
    with pytest.raises(errors.UserError, match="unknown TPU topology 'v9-8'"):
        aot.get_topology("v9-8")
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu raises ImportError
    with pytest.raises(errors.UserError, match=r'pip install -e "\.\[tpu\]"'):
        aot.get_topology("v3-8")


def test_the_command_reports_a_user_error_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_jax.tools.aot", "--config", "configs/digits.py"]
        + ["--topology", "v9-8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: unknown TPU topology 'v9-8'; use one of {', '.join(aot.TOPOLOGIES)} or a "
        "libtpu name such as v3:2x2"
    ]


# ---------------------------------------------------------------------------------------------
# Reading the compiled HLO


def test_shape_bytes_of_hlo_result_types():
    assert xla_analysis.shape_bytes("f32[8,4]{1,0}") == 128
    assert xla_analysis.shape_bytes("(f32[8,4]{1,0:T(8,128)}, bf16[2]{0}, pred[3])") == 128 + 4 + 3
    assert xla_analysis.shape_bytes("s32[]") == 4


@pytest.mark.parametrize(
    "text, groups",
    [
        ("replica_groups={{0,1},{2,3}}", [[0, 1], [2, 3]]),
        ("replica_groups=[1,4]<=[4]", [[0, 1, 2, 3]]),
        ("replica_groups=[2,2]<=[4]", [[0, 1], [2, 3]]),
        ("replica_groups=[2,2]<=[2,2]T(1,0)", [[0, 2], [1, 3]]),
        ("no groups", [[0, 1, 2, 3]]),
    ],
)
def test_replica_groups(text, groups):
    line = f"%x = f32[4] all-reduce(%y), {text}, to_apply=%add"
    assert xla_analysis.replica_groups(line, 4) == groups


class _Device:
    def __init__(self, process_index):
        self.process_index = process_index


def test_collectives_count_bytes_and_hosts():
    """Devices 0-1 on host 0, 2-3 on host 1: a group of all four crosses hosts, {0,1} not;
    async pairs count once; other ops are not collectives; bytes per element type."""
    mesh = np.empty(4, object)
    mesh[:] = [_Device(0), _Device(0), _Device(1), _Device(1)]
    mesh = type("Mesh", (), {"devices": mesh, "size": 4})()
    hlo = "\n".join(
        [
            "  %a = f32[100]{0} all-reduce(f32[100]{0} %p), replica_groups=[1,4]<=[4]",
            "  %b = (f32[10]{0}, bf16[10]{0}) all-reduce-start(%q, %r), "
            "replica_groups={{0,1},{2,3}}",
            "  %c = (f32[10]{0}, bf16[10]{0}) all-reduce-done(%b)",
            "  %d = f32[100]{0} add(%a, %a)",
        ]
    )
    assert xla_analysis.collectives(hlo, mesh) == {
        "count": 2,
        "bytes": 400 + 60,
        "cross_host_count": 1,
        "cross_host_bytes": 400,
        "ops": {"all-reduce": 2},
        "dtypes": {"f32": 400 + 40, "bf16": 20},
    }


HLO_LOOPS = """\
%search_cond (p: (s32[])) -> pred[] {
  %c = s32[] constant(10)
  ROOT %lt = pred[] compare(%g, %c), direction=LT
}

%search_body (p: (s32[])) -> (s32[]) {
  %a = s32[] add(%g, %one)
}

%fused_conv (p0: f32[2,8,8,4], p1: f32[3,3,2,4]) -> f32[2,6,6,4] {
  %p0 = f32[2,8,8,4]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,2,4]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[2,6,6,4]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}, \
dim_labels=b01f_01io->b01f, feature_group_count=2
}

%scan_cond (p: (s32[])) -> pred[] {
  %c = s32[]{:T(256)} constant(50)
  ROOT %lt = pred[] compare(%g, %c), direction=LT
}

%scan_body (p: (s32[], f32[2,16], f32[16,4])) -> (s32[]) {
  %y = f32[2,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,4]{1,0} get-tuple-element(%p), index=2
  %f = f32[2,6,6,4]{3,2,1,0} fusion(%x, %k), kind=kOutput, calls=%fused_conv
  %d = f32[2,4]{1,0} dot(%y, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %w2 = (s32[]) while(%t), condition=%search_cond, body=%search_body
}

ENTRY %main (a: f32[64,128], b: f32[128,64]) -> f32[64,64] {
  %a = f32[64,128]{1,0} parameter(0)
  %b = f32[128,64]{1,0} parameter(1)
  %w1 = (s32[]) while(%t), condition=%scan_cond, body=%scan_body
  ROOT %e = f32[64,64]{1,0} dot(f32[64,128]{1,0} %a, f32[128,64]{1,0} %b), \
lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_loop_factor_weighs_loops_by_their_products_flops():
    """A 50-step scan of a grouped 3x3 convolution (2 x 288 outputs x 3 x 3 x 2 input
    features per group = 10368 FLOPs) and a 2x16 @ 16x4 product (256), and a 64x128 @ 128x64
    product outside (2 x 64 x 64 x 128 = 1048576); the 10-step loop without products inside
    the scan weighs nothing. Operand shapes from their definitions or the line itself."""
    conv, small, big = 2 * 288 * 3 * 3 * 2, 2 * 2 * 4 * 16, 2 * 64 * 64 * 128
    per_call, once = big + 50 * (conv + small), big + conv + small
    assert xla_analysis.loop_factor(HLO_LOOPS) == pytest.approx(
        per_call / once
    )  # counting: 101 / 3
    assert xla_analysis.program_flops(HLO_LOOPS) == (per_call, once)
    assert (
        xla_analysis.loop_factor(
            "ENTRY %main (a: f32[2]) -> f32[2] {\n  %x = f32[2] add(%a, %a)\n}"
        )
        == 1
    )


def _conv(x, k, **kw):
    return jax.lax.conv_general_dilated(x, k, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)


def _grad_kernel(k, x):
    return jax.grad(lambda k: _conv(x, k, window_strides=(1, 1), padding="SAME").sum())(k)


PRODUCTS = {  # name: (function, argument shapes)
    "matmul": (jnp.matmul, [(512, 512), (512, 512)]),
    "matmul 7x13x5": (jnp.matmul, [(7, 13), (13, 5)]),
    "matvec": (jnp.matmul, [(8, 16), (16,)]),
    "batched dot": (lambda x, y: jnp.einsum("bij,bjk->bik", x, y), [(4, 8, 16), (4, 16, 5)]),
    "two batch dims": (
        lambda x, y: jnp.einsum("abij,bjk->bika", x, y),
        [(3, 4, 8, 16), (4, 16, 5)],
    ),
    "conv same": (
        lambda x, k: _conv(x, k, window_strides=(1, 1), padding="SAME"),
        [(2, 16, 12, 6), (3, 3, 6, 12)],
    ),
    "conv stride 2": (
        lambda x, k: _conv(x, k, window_strides=(2, 2), padding="SAME"),
        [(2, 16, 12, 6), (3, 3, 6, 12)],
    ),
    "conv valid": (
        lambda x, k: _conv(x, k, window_strides=(1, 1), padding="VALID"),
        [(2, 16, 12, 6), (3, 3, 6, 12)],
    ),
    "conv dilated": (
        lambda x, k: _conv(x, k, window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 2)),
        [(2, 16, 12, 6), (3, 3, 6, 12)],
    ),
    "conv transposed": (
        lambda x, k: _conv(
            x, k, window_strides=(1, 1), padding=((2, 2), (1, 1)), lhs_dilation=(2, 2)
        ),
        [(2, 16, 12, 6), (3, 3, 6, 12)],
    ),
    "conv 3 groups": (
        lambda x, k: _conv(x, k, window_strides=(1, 1), padding="SAME", feature_group_count=3),
        [(2, 16, 12, 6), (3, 3, 2, 12)],
    ),
    "conv depthwise": (
        lambda x, k: _conv(
            x, k, window_strides=(2, 1), padding=((0, 1), (1, 0)), feature_group_count=6
        ),
        [(2, 16, 12, 6), (3, 3, 1, 12)],
    ),
    "conv 1-D NCW": (
        lambda x, k: jax.lax.conv_general_dilated(
            x, k, (1,), "SAME", dimension_numbers=("NCW", "OIW", "NCW")
        ),
        [(2, 6, 16), (4, 6, 5)],
    ),
    "conv kernel gradient": (_grad_kernel, [(3, 3, 6, 12), (2, 16, 16, 6)]),
}


@pytest.mark.parametrize("name", PRODUCTS)
def test_product_flops_are_xla_cost_analysis_flops(name):
    """One product compiled by XLA:CPU: its FLOPs read from the HLO equal the cost
    analysis' (which counts padding and dilation holes as no work)."""
    fn, shapes = PRODUCTS[name]
    compiled = jax.jit(fn).lower(*[jax.ShapeDtypeStruct(s, np.float32) for s in shapes]).compile()
    assert (
        xla_analysis.program_flops(compiled.as_text())
        == (xla_analysis.cost(compiled)["flops"],) * 2
    )


@needs_libtpu
def test_product_flops_are_the_tpu_compilers_cost_analysis_flops():
    """The TPU compiler rewrites products (a batched dot becomes a convolution with a dilated
    window, a grouped convolution a 3-D one, a kernel gradient one with the batch as
    features): the FLOPs read from its HLO are still its cost analysis'."""
    sharding = jax.sharding.NamedSharding(
        aot.get_topology("v3-8").mesh(), jax.sharding.PartitionSpec()
    )
    for name in ("batched dot", "conv 3 groups", "conv transposed", "conv kernel gradient"):
        fn, shapes = PRODUCTS[name]
        args = [jax.ShapeDtypeStruct(s, np.float32, sharding=sharding) for s in shapes]
        compiled = jax.jit(fn).lower(*args).compile()
        assert (
            xla_analysis.program_flops(compiled.as_text())
            == (xla_analysis.cost(compiled)["flops"],) * 2
        ), name


def _scan(body, n):
    """`x -> body(x)` n times in a `lax.scan` (a `while` in the HLO)."""
    return lambda x: jax.lax.scan(lambda c, _: (body(c), None), x, None, n)[0]


def _conv_valid(x, k):  # 3x3, 4 -> 4 features: 2 x outputs x 3 x 3 x 4 FLOPs
    return _conv(x, k, window_strides=(1, 1), padding="VALID")


LOOPS = {  # name: (function, argument shapes, FLOPs per call)
    # The case: the 512x512 product once, the 8x8 one 100 times.
    "big product outside, small in a loop": (
        lambda a, b: (a @ a, _scan(lambda c: c @ c, 100)(b)),
        [(512, 512), (8, 8)],
        2 * 512**3 + 100 * 2 * 8**3,
    ),
    "convolution outside, product in a loop": (
        lambda x, k, b: (_conv_valid(x, k), _scan(lambda c: c @ c, 30)(b)),
        [(2, 18, 18, 4), (3, 3, 4, 4), (16, 16)],
        2 * (2 * 16 * 16 * 4) * 9 * 4 + 30 * 2 * 16**3,
    ),
    "product outside, convolution in a loop": (
        lambda x, k, a: (
            _scan(lambda c: jnp.pad(_conv_valid(c, k), ((0, 0), (1, 1), (1, 1), (0, 0))), 20)(x),
            a @ a,
        ),
        [(2, 8, 8, 4), (3, 3, 4, 4), (64, 64)],
        20 * 2 * (2 * 6 * 6 * 4) * 9 * 4 + 2 * 64**3,
    ),
    "nested loops": (
        lambda a, b, c: (
            a @ a,
            _scan(lambda bc: (bc[0] @ bc[0], _scan(lambda c: c @ c, 5)(bc[1])), 10)((b, c)),
        ),
        [(64, 64), (8, 8), (16, 16)],
        2 * 64**3 + 10 * (2 * 8**3 + 5 * 2 * 16**3),
    ),
}


@pytest.mark.parametrize("name", LOOPS)
def test_loop_factor_times_the_cost_analysis_is_the_flops_per_call(name):
    """Programs compiled by XLA:CPU with products inside and outside (nested) loops: the cost
    analysis counts each loop body once; times the loop factor it is the FLOPs of one call,
    counted by hand (to the loop counters' scalar adds, a few FLOPs a step)."""
    fn, shapes, flops = LOOPS[name]
    compiled = jax.jit(fn).lower(*[jax.ShapeDtypeStruct(s, np.float32) for s in shapes]).compile()
    hlo = compiled.as_text()
    assert xla_analysis.loop_factor(hlo) * xla_analysis.cost(compiled)["flops"] == pytest.approx(
        flops, rel=1e-4
    )
    assert xla_analysis.program_flops(hlo)[0] == flops


@needs_libtpu
def test_loop_factor_of_a_compiled_scan():
    """A scan of N matrix products on a v3-8: the compiler's cost analysis counts the body
    once, the factor N restores the per-call FLOPs."""
    topo = aot.get_topology("v3-8")
    sharding = jax.sharding.NamedSharding(topo.mesh(), jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((128, 128), np.float32, sharding=sharding)
    for n in (10, 30):
        fn = jax.jit(lambda x, n=n: jax.lax.scan(lambda c, _: (c @ c, None), x, None, n)[0])
        compiled = fn.lower(x).compile()
        assert xla_analysis.cost(compiled)["flops"] == pytest.approx(2 * 128**3, rel=0.01)
        assert xla_analysis.loop_factor(compiled.as_text()) == n


@pytest.mark.parametrize("optimal", [-212.0, 0.0, float("nan"), None])
def test_no_estimate_is_reported_as_none_not_as_a_time(optimal):
    """libtpu 0.0.42.1 answers optimal_seconds = -212 for v5e (no cost model): the row says
    'none' and its JSON null, never a negative or NaN time."""
    assert aot.estimated_seconds(optimal, 1000.0) is None
    assert aot.estimated_seconds(0.0182, 4.0) == pytest.approx(0.0728)
    row = {
        "program": "sample",
        "argument_bytes": 2**30,
        "temp_bytes": 2**30,
        "output_bytes": 0,
        "code_bytes": 2**20,
        "resident_bytes": 0,
        "peak_bytes": 2 * 2**30,
        "hbm_bytes": 16 * 2**30,
        "fits": True,
        "flops": 3.7e14,
        "bytes_accessed": 3.5e12,
        "estimated_seconds": None,
        "per_second": None,
        "unit": "samples",
        "mfu": None,
        "compile_seconds": 67.0,
        "collectives": {"cross_host_count": 0, "cross_host_bytes": 0},
    }
    line = aot.format_table([row]).splitlines()[-1]
    assert line.count("none") == 3 and "nan" not in line and "-" not in line
    assert json.loads(json.dumps(row))["estimated_seconds"] is None


class _Compiled:
    """What `aot.analyse` reads of a compiled program: known FLOPs, time and memory."""

    def cost_analysis(self):
        return {"flops": 3e12, "optimal_seconds": 0.25, "bytes accessed": 1e9}

    def memory_analysis(self):
        sizes = {"argument": 100, "output": 40, "alias": 30, "temp": 7, "generated_code": 5}
        return types.SimpleNamespace(**{f"{k}_size_in_bytes": v for k, v in sizes.items()})

    def as_text(self):
        return "ENTRY %main () -> f32[] {\n  ROOT %c = f32[] constant(0)\n}"


@pytest.mark.parametrize(
    "kind, topology, per_chip",
    [
        ("TPU v3", "v3:2x2", 2),
        ("TPU v4", "v4:2x2x1", 1),
        ("TPU v5", "v5p:2x2x1", 1),
        ("TPU v5 lite", "v5e:2x2", 1),
        ("TPU v6 lite", "v6e:2x2", 1),
    ],
)
def test_aot_and_the_benchmark_read_one_chip_table(monkeypatch, kind, topology, per_chip):
    """A chip's peak and HBM per device are `xla_analysis.CHIPS`'s, for aot's topology and
    MFU and for the benchmark's MFU alike: the same FLOPs in the same seconds give one MFU."""
    from jax.experimental import topologies

    from diffusion_jax.runtime import distributed
    from diffusion_jax.tools.benchmark import environment, timing

    fake = [types.SimpleNamespace(device_kind=kind, process_index=0)] * (4 * per_chip)
    monkeypatch.setitem(sys.modules, "libtpu", types.ModuleType("libtpu"))
    monkeypatch.setattr(
        topologies, "get_topology_desc", lambda **_: types.SimpleNamespace(devices=fake)
    )
    chip = xla_analysis.chip(kind)
    topo = aot.get_topology(topology)
    assert (topo.peak_flops, topo.hbm_bytes) == (chip.peak_flops, chip.hbm_bytes)

    compiled = _Compiled()
    lowered = types.SimpleNamespace(compile=lambda: compiled)
    fn = types.SimpleNamespace(lower=lambda *args: lowered)
    mesh = distributed.make_mesh(jax.devices()[:1])
    aot_row = aot.analyse(aot.Program("train", fn, (), 8, "steps", mesh, resident=11), topo)
    expected = 3e12 / 0.25 / chip.peak_flops
    assert aot_row["mfu"] == pytest.approx(expected)
    bench_row = timing.row(
        "train",
        "bfloat16",
        8,
        seconds=0.25,
        seconds_all=[0.25],
        images=8,
        flops=timing.compiled_flops(compiled),
        peak=environment.peak_tflops(kind),
    )
    assert bench_row["mfu"] == pytest.approx(expected)
    # One memory formula: arguments + outputs - aliased + temporaries + code (+ resident).
    memory = timing.compiled_memory(compiled)
    assert memory["peak_bytes"] == 100 + 40 - 30 + 7 + 5
    assert aot_row["peak_bytes"] == memory["peak_bytes"] + 11


def test_the_v3_peak_is_123_tflops_per_chip_over_two_cores():
    from diffusion_jax.tools.benchmark import environment

    v3 = xla_analysis.CHIPS["tpu v3"]
    assert (v3.chip_bf16_flops, v3.devices, v3.hbm_bytes) == (123e12, 2, 16 * 2**30)
    assert environment.peak_tflops("TPU v3") == pytest.approx(61.5)
    assert xla_analysis.chip("TPU v5 lite").peak_flops == 197e12  # not v5p's 459
    assert xla_analysis.chip("NVIDIA H100 PCIe").peak_flops == 756e12  # not the SXM's 989
    assert xla_analysis.chip("cpu") is None


def test_out_of_memory_is_one_test_for_aot_and_the_benchmark():
    from diffusion_jax.tools.benchmark import timing

    assert timing.is_oom is xla_analysis.is_oom
    assert xla_analysis.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 2GiB"))
    assert xla_analysis.is_oom(ValueError("XLA:TPU compile permanent error. Ran out of memory"))
    assert not xla_analysis.is_oom(ValueError("incompatible shapes"))


def _prepare_then_loop(prepare, n, unroll, inside=False):
    """A sampler's shape: `prepare` the weights (a scale, a cast to bfloat16) once before a
    loop of n products with them, or `inside` each step (as the model casts its kernels, which
    XLA hoists), `unroll` steps per turn of the loop (True: all, no loop)."""

    def fn(w, x):
        w = w if inside else prepare(w)
        ready = prepare if inside else (lambda w: w)

        def step(c, _):
            v = ready(w)
            return (c.astype(v.dtype) @ v).astype(jnp.float32), None

        return jax.lax.scan(step, x, None, n, unroll=unroll)[0]

    return jax.jit(fn)


def _per_call_and_truth(key, prepare, n, shapes, compile_, inside=False):
    """`per_call` of `key` from the program and its twin (2 steps per turn), the factor's
    answer, and the count of the loop-free program (fully unrolled): the truth."""
    once, twin, unrolled = (
        float(xla_analysis.cost(compile_(_prepare_then_loop(prepare, n, u, inside), shapes))[key])
        for u in (1, 2, True)
    )
    return xla_analysis.per_call(once, twin, n, 2), n * once, unrolled


@pytest.mark.parametrize("n", [2, 3, 9, 10])
def test_per_call_counts_the_work_before_a_loop_once(n):
    """XLA:CPU, FLOPs: a 256x256 scale before a loop of n 8x256x256 products. The program and
    its unrolled twin give the loop-free program's FLOPs exactly (odd n: jax runs the last
    step after the loop); scaling by the trips counts the scale n times."""
    shapes = [(256, 256), (8, 256)]
    compile_ = lambda fn, s: fn.lower(*[jax.ShapeDtypeStruct(x, np.float32) for x in s]).compile()
    ours, factor, truth = _per_call_and_truth("flops", lambda w: w * 2.0 + 1.0, n, shapes, compile_)
    assert ours == pytest.approx(truth, rel=1e-6)
    assert factor > truth + (n - 1) * 256**2  # the scale's 2 x 256^2 FLOPs counted n times
    with pytest.raises(ValueError, match="no twin"):
        xla_analysis.per_call(1.0, 2.0, 1, 2)


@needs_libtpu
@pytest.mark.parametrize("inside", [False, True])
def test_per_call_estimate_of_a_cast_before_a_loop_on_a_v3_8(inside):
    """The TPU compiler's time estimate: a float32 -> bfloat16 cast of a 2048x2048 matrix (a
    sampler's parameters) before 9 products with it, or written inside each step (as the
    U-Net's layers cast their kernels; the compiler hoists it). From the program and its twin,
    the loop-free program's estimate within 5%; the factor's is off by more than half."""
    topo = aot.get_topology("v3-8")
    sharding = jax.sharding.NamedSharding(topo.mesh(), jax.sharding.PartitionSpec())
    compile_ = lambda fn, shapes: fn.lower(
        *[jax.ShapeDtypeStruct(s, np.float32, sharding=sharding) for s in shapes]
    ).compile()
    cast = lambda w: w.astype(jnp.bfloat16)
    ours, factor, truth = _per_call_and_truth(
        "optimal_seconds", cast, 9, [(2048, 2048), (128, 2048)], compile_, inside
    )
    assert ours == pytest.approx(truth, rel=0.05)
    assert factor > 1.5 * truth


class _Fake:
    """A stand-in jitted program: `.lower(*args).compile()` gives `cost` or raises `error`."""

    def __init__(self, cost=None, error=None):
        self.cost, self.error = cost, error

    def lower(self, *args):
        return self

    def compile(self):
        if self.error is not None:
            raise self.error
        return types.SimpleNamespace(cost_analysis=lambda: self.cost)


def test_a_twin_that_does_not_fit_or_counts_less_falls_back_to_the_factor():
    """The twin only refines the estimate: one that runs out of memory, or whose counts are
    below the program's (impossible for more loop bodies), leaves the loop factor to count;
    any other compile error is a bug and propagates."""
    cost = {"flops": 10.0, "bytes accessed": 5.0, "optimal_seconds": 1.0}
    program = lambda twin: aot.Program("sample", None, (), 8, "samples", None, twin=twin, trips=9)
    more = {k: 2 * v for k, v in cost.items()}
    assert aot._twin_cost(program(_Fake(more)), cost) == more
    assert aot._twin_cost(program(None), cost) is None
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 2GiB")
    assert aot._twin_cost(program(_Fake(error=oom)), cost) is None
    assert aot._twin_cost(program(_Fake({**more, "optimal_seconds": 0.5})), cost) is None
    with pytest.raises(ValueError, match="bug"):
        aot._twin_cost(program(_Fake(error=ValueError("a bug"))), cost)
