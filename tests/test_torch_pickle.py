"""diffusion_jax.runtime.torch_pickle: torch-free, code-free reading of torch.save state dicts.

Files are produced by tests/torch_files.py (checked against real torch.load/torch.save
outside the default tests by launch/check_inception_vs_pytorch_fid.py).
"""

import pickle

import ml_dtypes
import numpy as np
import pytest
from torch_files import ForeignCall, RawTensor, save_torch_object, save_torch_state_dict

from diffusion_jax.runtime.torch_pickle import (
    TorchPickleError,
    load_torch_file,
    load_torch_state_dict,
)

FORMATS = [pytest.param(False, id="zip"), pytest.param(True, id="legacy")]


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    shared = rng.standard_normal((3, 5, 7)).astype(np.float64)
    return {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "f64": rng.standard_normal((2, 3)),
        "f16": rng.standard_normal(5).astype(np.float16),
        "bf16": np.arange(6).astype(ml_dtypes.bfloat16),
        "i64": np.arange(-3, 4, dtype=np.int64),
        "i32": np.array([1, -2, 2**31 - 1], dtype=np.int32),
        "i16": np.array([-7, 300], dtype=np.int16),
        "i8": np.array([-128, 127], dtype=np.int8),
        "u8": np.arange(250, 256, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "c64": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        "scalar": np.array(2.5, dtype=np.float32),
        "num_batches_tracked": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "big_endian": np.arange(5, dtype=">f4"),
        # views sharing one storage, as torch tensors sharing memory are saved
        "base": base,
        "transposed": base.T,
        "sliced": base[1:, ::2],
        "column": base[:, 3],
        "shared_permuted": np.transpose(shared, (2, 0, 1)),
        "shared_strided": shared[::2, 1:4, ::3],
    }


@pytest.mark.parametrize("legacy", FORMATS)
def test_round_trip_values_dtypes_and_views(tmp_path, legacy):
    state = _state()
    path = tmp_path / "state.pth"
    save_torch_state_dict(state, path, legacy=legacy)
    loaded = load_torch_state_dict(path)
    assert list(loaded) == list(state)
    for name, want in state.items():
        got = loaded[name]
        assert isinstance(got, np.ndarray), name
        assert got.shape == want.shape, name
        assert got.dtype == want.dtype.newbyteorder("="), (name, got.dtype, want.dtype)
        assert got.flags.c_contiguous, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_views_share_one_storage_in_the_file(tmp_path):
    base = np.arange(12.0).reshape(3, 4)
    path = tmp_path / "views.pth"
    save_torch_state_dict({"a": base, "b": base.T, "c": base[::2, 1:]}, path)
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data_entries = [n for n in archive.namelist() if n.startswith("archive/data/")]
    assert data_entries == ["archive/data/0"]  # one storage, three strided views of it
    loaded = load_torch_state_dict(path)
    np.testing.assert_array_equal(loaded["c"], base[::2, 1:])


@pytest.mark.parametrize("legacy", FORMATS)
def test_explicit_offset_and_strides(tmp_path, legacy):
    storage = np.arange(30, dtype=np.int32)
    tensor = RawTensor(storage, offset=3, shape=(2, 3, 2), stride=(10, 1, 4))
    path = tmp_path / "raw.pth"
    save_torch_object({"t": tensor}, path, legacy=legacy)
    want = np.lib.stride_tricks.as_strided(storage[3:], (2, 3, 2), (40, 4, 16))
    np.testing.assert_array_equal(load_torch_state_dict(path)["t"], want)


@pytest.mark.parametrize("legacy", FORMATS)
def test_view_past_the_storage_is_rejected(tmp_path, legacy):
    storage = np.arange(10, dtype=np.float32)
    path = tmp_path / "oob.pth"
    save_torch_object({"t": RawTensor(storage, 4, (3, 3), (3, 1))}, path, legacy=legacy)
    with pytest.raises(TorchPickleError, match="reaches element"):
        load_torch_state_dict(path)


@pytest.mark.parametrize("legacy", FORMATS)
@pytest.mark.parametrize(
    "module, name", [("os", "system"), ("builtins", "eval"), ("subprocess", "call")]
)
def test_foreign_global_is_rejected_without_running(tmp_path, legacy, module, name):
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if name != "eval" else f"open({str(marker)!r}, 'w')"
    payload = ForeignCall(module, name, (command if name != "call" else ["touch", str(marker)],))
    path = tmp_path / "evil.pth"
    save_torch_object({"w": np.ones(3, np.float32), "x": payload}, path, legacy=legacy)
    assert f"{module}\n{name}\n".encode() in path.read_bytes()  # the global is really there
    with pytest.raises(ValueError, match=rf"{module}\.{name}"):
        load_torch_state_dict(path)
    assert not marker.exists()


def test_foreign_global_in_the_legacy_header_is_rejected(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_header.pth"

    class Evil:
        def __reduce__(self):
            return (print, (f"would run: touch {marker}",))

    path.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(ValueError, match=r"(__builtin__|builtins)\.print"):
        load_torch_file(path)


def test_not_a_state_dict_is_reported(tmp_path):
    path = tmp_path / "nested.pth"
    save_torch_object({"model": {"w": np.ones(2, np.float32)}, "step": 3}, path)
    nested = load_torch_file(path)
    np.testing.assert_array_equal(nested["model"]["w"], np.ones(2))
    with pytest.raises(TorchPickleError, match="not named tensors"):
        load_torch_state_dict(path)


def test_garbage_is_rejected(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(pickle.dumps(12345, protocol=2) + b"\x00" * 16)
    with pytest.raises(TorchPickleError, match="magic number"):
        load_torch_state_dict(path)
