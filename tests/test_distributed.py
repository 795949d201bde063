"""diffusion_jax.runtime.distributed: the XLA compiler options every jitted model program gets."""

import inspect
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from configs.cifar10 import get_config
from diffusion_jax.diffusion import process
from diffusion_jax.evaluation import bpd
from diffusion_jax.metrics import inception
from diffusion_jax.runtime import distributed, errors
from diffusion_jax.sampling import generation
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import train_step


def _tap(a: np.ndarray, i: int, j: int) -> np.ndarray:
    """a[:, h + i - 1, w + j - 1] (zero outside), [B, H, W, C]: tap (i, j) of a SAME 3x3 window."""
    h, w = a.shape[1:3]
    return np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))[:, i : i + h, j : j + w]


def test_cpu_programs_keep_ynnpack_for_matmuls_only(devices):
    mesh = distributed.make_mesh(devices)
    options = distributed.compiler_options(mesh)
    assert options == distributed.CPU_COMPILER_OPTIONS
    assert distributed.compiler_options() == options  # the default backend is CPU here

    # The convolutions these options hand to other kernels, forward and both gradients,
    # against float64 NumPy (the gradients of sum(y * g) are closed forms of the taps).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 16, 32)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 32, 32)) / 17).astype(np.float32)
    g = rng.standard_normal((4, 16, 16, 32)).astype(np.float32)

    def conv(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)

    def loss(x, w):
        return jnp.sum(conv(x, w) * g)

    fn = jax.jit(lambda x, w: (conv(x, w), jax.grad(loss, (0, 1))(x, w)), compiler_options=options)
    y, (dx, dw) = fn(x, w)
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    taps = [(i, j) for i in range(3) for j in range(3)]
    y_ref = sum(_tap(x64, i, j) @ w64[i, j] for i, j in taps)
    dx_ref = sum(_tap(g64, 2 - i, 2 - j) @ w64[i, j].T for i, j in taps)
    dw_ref = np.stack([np.einsum("bhwi,bhwo->io", _tap(x64, i, j), g64) for i, j in taps])
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, dw_ref.reshape(w.shape), rtol=1e-4, atol=1e-3)


def test_options_this_jax_rejects_are_left_out(monkeypatch):
    monkeypatch.setattr(distributed, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": "1"})
    assert distributed.compiler_options() == {}


def test_accelerators_get_no_cpu_options():
    gpu_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")]))
    assert distributed.compiler_options(gpu_mesh) == {}


def _tiny_unet_config():
    config = get_config()
    config.data.image_size = 8
    config.model.update(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4)
    return config


def _compile_train(mesh):
    config = _tiny_unet_config()
    graphdef, _, rest = nnx.split(state_lib.abstract_model(config), nnx.Param, ...)
    state = jax.eval_shape(lambda: state_lib.init_train_state(config)[2])
    fn = train_step.compile_train_fn(
        config,
        generation.model_apply(graphdef, rest),
        process.from_config(config.diffusion),
        state_lib.make_optimizer(config),
        mesh,
    )
    batch = {
        "image": jax.ShapeDtypeStruct((1, 8, 8, 8, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((1, 8), jnp.int32),
    }
    fn.lower(state, batch).compile()


def _compile_sampler_and_bpd(mesh):
    config = _tiny_unet_config()
    graphdef, _, rest = nnx.split(state_lib.abstract_model(config), nnx.Param, ...)
    apply = generation.model_apply(graphdef, rest)
    params = jax.eval_shape(lambda: state_lib.init_train_state(config)[2]).params
    labels = jax.ShapeDtypeStruct((8,), jnp.int32)
    key = jax.random.PRNGKey(0)
    generation.make_sampler(config, apply, mesh, 8, "2").lower(params, key, labels).compile()
    images = jax.ShapeDtypeStruct((8, 8, 8, 3), jnp.uint8)
    mask = jax.ShapeDtypeStruct((8,), jnp.float32)
    bpd_fn = bpd.make_bpd_fn(config, apply, mesh, precision="highest")
    bpd_fn.lower(params, images, labels, mask, key).compile()


def _compile_inception(mesh):
    zeros = lambda key, shape, dtype=np.float32: np.zeros(shape, dtype)
    params = nnx.state(inception.InceptionV3(nnx.Rngs(0), kernel_init=zeros))
    fn = inception.make_feature_fn(params, mesh, size=75)
    fn.forward.lower(fn.params, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.uint8)).compile()


@pytest.mark.parametrize(
    "compile_programs,modules",
    [
        (_compile_train, ["jit_multi_step"]),
        (_compile_sampler_and_bpd, ["jit_draw", "jit_run"]),
        (_compile_inception, ["jit_forward"]),
    ],
)
def test_model_programs_compile_with_the_options(compile_programs, modules, tmp_path, monkeypatch):
    """Every jitted program that runs a model takes `compiler_options(mesh)`: options that
    make XLA dump each module it compiles show one dump per program."""
    dump = {"xla_dump_to": str(tmp_path)}
    monkeypatch.setattr(distributed, "compiler_options", lambda mesh=None: dump)
    compile_programs(distributed.make_mesh(jax.devices()[:1]))
    dumped = [p.name.split(".")[1] for p in tmp_path.glob("*after_optimizations.txt")]
    assert sorted(dumped) == modules


# ---------------------------------------------------------------------------------------------
# maybe_initialize_distributed: which environments call jax.distributed.initialize, and with
# what. The call is recorded, never made.

# Every variable it (or the JAX cluster detection it consults) reads.
DISTRIBUTED_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID TPU_PROCESS_ADDRESSES "
    "TPU_WORKER_HOSTNAMES TPU_WORKER_ID MEGASCALE_NUM_SLICES MEGASCALE_SLICE_ID "
    "MEGASCALE_COORDINATOR_ADDRESS SLURM_JOB_ID SLURM_STEP_NODELIST SLURM_NTASKS SLURM_PROCID "
    "SLURM_LOCALID OMPI_MCA_orte_hnp_uri OMPI_COMM_WORLD_SIZE OMPI_COMM_WORLD_RANK "
    "OMPI_COMM_WORLD_LOCAL_RANK KUBERNETES_SERVICE_HOST"
).split()


@pytest.fixture
def initialize_calls(monkeypatch):
    """A clean environment, and the keyword arguments of each jax.distributed.initialize call."""
    for name in DISTRIBUTED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def test_initialize_takes_the_arguments_passed():
    params = inspect.signature(jax.distributed.initialize).parameters
    assert set(distributed.EXPLICIT_VARIABLES) <= set(params)


def test_single_host_does_not_initialize(initialize_calls):
    distributed.maybe_initialize_distributed()
    assert initialize_calls == []
    assert distributed.initialize_arguments() is None


@pytest.mark.parametrize(
    "variables, expected",
    [
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476"}, {"coordinator_address": "10.0.0.1:8476"}),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476",
                "JAX_NUM_PROCESSES": "4",
                "JAX_PROCESS_ID": "3",
            },
            {"coordinator_address": "10.0.0.1:8476", "num_processes": 4, "process_id": 3},
        ),
        # Without a coordinator JAX's cluster detection supplies it.
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, {"num_processes": 2, "process_id": 0}),
        # Explicit values win over a TPU environment.
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "TPU_WORKER_HOSTNAMES": "a,b"},
            {"coordinator_address": "h:1"},
        ),
    ],
    ids=["coordinator-only", "all-three", "count-and-index", "explicit-over-tpu"],
)
def test_explicit_values_are_passed_where_given(variables, expected, initialize_calls, monkeypatch):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    distributed.maybe_initialize_distributed()
    assert initialize_calls == [expected]


@pytest.mark.parametrize(
    "variables, several",
    [
        ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "2"}, True),
        ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8471,10.0.0.2:8471", "TPU_WORKER_ID": "0"}, True),
        ({"TPU_WORKER_HOSTNAMES": "t-0", "MEGASCALE_NUM_SLICES": "2"}, True),  # multislice
        ({"TPU_WORKER_HOSTNAMES": "t-0", "TPU_WORKER_ID": "0"}, False),  # one host
        ({"TPU_WORKER_HOSTNAMES": "t-0,", "MEGASCALE_NUM_SLICES": "1"}, False),
    ],
    ids=["gke-pod", "process-addresses", "multislice", "gke-one-host", "one-host-one-slice"],
)
def test_tpu_pod_environment_lets_jax_detect(variables, several, initialize_calls, monkeypatch):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    distributed.maybe_initialize_distributed()
    assert initialize_calls == ([{}] if several else [])


@pytest.mark.parametrize(
    "workers, several",
    [("t-0:0:10.0.0.1,t-1:1:10.0.0.2,t-2:2:10.0.0.3", True), ("t-0:0:10.0.0.1", False)],
)
def test_cloud_tpu_vm_pod_slice_from_metadata(workers, several, initialize_calls, monkeypatch):
    """A Compute Engine TPU VM sets no variables: the worker list in the VM metadata (here a
    stand-in for the metadata server) tells a pod slice, which initializes, from one host."""
    monkeypatch.setattr(distributed.platforms, "cloud_tpu_vm", lambda: True)
    monkeypatch.setattr(distributed, "_fetch_tpu_workers", lambda: workers)
    distributed.maybe_initialize_distributed()
    assert initialize_calls == ([{}] if several else [])


def test_off_tpu_vms_the_metadata_server_is_not_asked(initialize_calls, monkeypatch):
    asked = []
    monkeypatch.setattr(distributed, "_fetch_tpu_workers", lambda: asked.append(1) or "a,b")
    distributed.maybe_initialize_distributed()
    assert asked == [] and initialize_calls == []


def test_an_unreachable_metadata_server_means_one_process(monkeypatch, caplog):
    """A TPU host outside Compute Engine: the query fails at once (nothing listens on the
    port), a warning says so, and the run goes on as one process."""
    monkeypatch.setattr(distributed, "TPU_WORKERS_URL", "http://127.0.0.1:9/workers")
    monkeypatch.setattr(distributed.platforms, "cloud_tpu_vm", lambda: True)
    assert distributed._tpu_vm_processes() == 1
    assert "no TPU VM metadata" in caplog.text


@pytest.mark.parametrize("ntasks, several", [("2", True), ("1", False)])
def test_slurm_job_from_its_variables(ntasks, several, initialize_calls, monkeypatch):
    """Slurm's variables decide; JAX's own detection then reads the rest."""
    for name, value in dict(
        SLURM_JOB_ID="77",
        SLURM_STEP_NODELIST="node[1-2]",
        SLURM_NTASKS=ntasks,
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
    ).items():
        monkeypatch.setenv(name, value)
    distributed.maybe_initialize_distributed()
    assert initialize_calls == ([{}] if several else [])


@pytest.mark.parametrize("size, several", [("4", True), ("1", False)])
def test_open_mpi_job_from_its_variables(size, several, initialize_calls, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", size)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    distributed.maybe_initialize_distributed()
    assert initialize_calls == ([{}] if several else [])


def test_a_slurm_count_outside_a_job_is_ignored(initialize_calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "4")  # left in a login shell, no SLURM_JOB_ID
    distributed.maybe_initialize_distributed()
    assert initialize_calls == []


@pytest.mark.parametrize(
    "variables, name",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "four"}, "JAX_NUM_PROCESSES"),
        ({"JAX_PROCESS_ID": "1.5"}, "JAX_PROCESS_ID"),
        ({"JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID"),
        ({"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "one"}, "TPU_WORKER_ID"),
        ({"TPU_WORKER_HOSTNAMES": "a", "MEGASCALE_NUM_SLICES": "two"}, "MEGASCALE_NUM_SLICES"),
    ],
)
def test_bad_values_name_the_variable(variables, name, initialize_calls, monkeypatch):
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(errors.UserError, match=f"^{name}="):
        distributed.maybe_initialize_distributed()
    assert initialize_calls == []
