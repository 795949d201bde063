"""`diffusion_jax.aot`: the run's own programs compiled by the TPU compiler for TPU slices
on this (CPU) host, and what the command reports of them.

The compiling tests need libtpu (`pip install -e ".[test]"` installs it on Linux x86-64)
and are skipped with that reason elsewhere; the parsing and error tests run everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config

from diffusion_jax import aot, errors
from diffusion_jax import state as state_lib

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
    "estimated_seconds",
    "per_second",
    "compile_seconds",
}
PROGRAMS = ("train", "sample", "bpd")


def _config(batch: int):
    """The tiny U-Net (one resolution) at `batch` for every program: compiles in seconds."""
    config = tiny_config()
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = (8,)
    config.training.batch_size = config.sampling.batch_size = config.eval.batch_size = batch
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

    # The same programs, compiled by XLA:CPU for 8 simulated devices at the same batch:
    # the TPU compiler counts the same FLOPs per device (within 10%).
    cpu = aot.Topology("cpu", "cpu", tuple(devices), 2**40, 1.0)
    for program in aot.build_programs(_config(16), cpu, PROGRAMS):
        compiled = program.fn.lower(*program.args).compile()
        flops = aot._cost(compiled)["flops"] * aot.loop_factor(compiled.as_text())
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
        [sys.executable, "-m", "diffusion_jax.aot", "--config", "configs/digits.py"]
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
    assert aot.shape_bytes("f32[8,4]{1,0}") == 128
    assert aot.shape_bytes("(f32[8,4]{1,0:T(8,128)}, bf16[2]{0}, pred[3])") == 128 + 4 + 3
    assert aot.shape_bytes("s32[]") == 4


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
    assert aot.replica_groups(f"%x = f32[4] all-reduce(%y), {text}, to_apply=%add", 4) == groups


class _Device:
    def __init__(self, process_index):
        self.process_index = process_index


def test_collectives_count_bytes_and_hosts():
    """Devices 0-1 on host 0, 2-3 on host 1: a group of all four crosses hosts, {0,1} not;
    async pairs count once; other ops are not collectives."""
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
    assert aot.collectives(hlo, mesh) == {
        "count": 2,
        "bytes": 400 + 60,
        "cross_host_count": 1,
        "cross_host_bytes": 400,
        "ops": {"all-reduce": 2},
    }


HLO_LOOPS = """\
%search_cond (p: (s32[])) -> pred[] {
  %c = s32[] constant(10)
  ROOT %lt = pred[] compare(%g, %c), direction=LT
}

%search_body (p: (s32[])) -> (s32[]) {
  %a = s32[] add(%g, %one)
}

%fused_conv (p0: f32[2,8,8,4]) -> f32[2,8,8,4] {
  ROOT %convolution.1 = f32[2,8,8,4]{3,2,1,0} convolution(%p0, %k), window={size=3x3}
}

%scan_cond (p: (s32[])) -> pred[] {
  %c = s32[]{:T(256)} constant(50)
  ROOT %lt = pred[] compare(%g, %c), direction=LT
}

%scan_body (p: (s32[])) -> (s32[]) {
  %f = f32[2,8,8,4]{3,2,1,0} fusion(%x), kind=kOutput, calls=%fused_conv
  %d = f32[2,4]{1,0} dot(%y, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %w = (s32[]) while(%t), condition=%search_cond, body=%search_body
}

ENTRY %main (a: f32[2]) -> f32[2] {
  %w1 = (s32[]) while(%t), condition=%scan_cond, body=%scan_body
  %e = f32[2,4]{1,0} dot(%y, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_loop_factor_weighs_loops_by_their_products():
    """Two products in a 50-step scan and one outside: 101 executed, 3 counted; the 10-step
    loop without products inside the scan weighs nothing."""
    assert aot.loop_factor(HLO_LOOPS) == pytest.approx(101 / 3)
    assert aot.loop_factor("ENTRY %main (a: f32[2]) -> f32[2] {\n  %x = f32[2] add(%a, %a)\n}") == 1


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
        assert aot._cost(compiled)["flops"] == pytest.approx(2 * 128**3, rel=0.01)
        assert aot.loop_factor(compiled.as_text()) == n


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
