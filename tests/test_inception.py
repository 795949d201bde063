"""diffusion_jax.metrics.inception: FID Inception v3 structure, weight loading, preprocessing.

The key table below is written from torchvision's Inception3 / pytorch-fid's
fid_inception_v3 definitions, independently of the module under test; its totals (566 keys,
23,885,486 elements) are those of pytorch-fid's real state dict, as measured by
launch/check_inception_vs_pytorch_fid.py (which also checks the numerics against torch).
"""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_files import ForeignCall, save_torch_object, save_torch_state_dict

from diffusion_jax.metrics import inception as inc
from diffusion_jax.metrics import inception_weights
from diffusion_jax.metrics.inception import (
    InceptionV3,
    load_inception_params,
    make_feature_fn,
    params_from_state_dict,
    preprocess,
)
from diffusion_jax.metrics.inception_weights import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_URL,
    InceptionWeightsUnavailable,
    inception_weights_path,
)
from diffusion_jax.runtime import errors


def _fid_inception_convs() -> list[tuple[str, int, int, int, int]]:
    """(prefix, in, out, kh, kw) of every BasicConv2d of pytorch-fid's network."""
    convs = [
        ("Conv2d_1a_3x3", 3, 32, 3, 3),
        ("Conv2d_2a_3x3", 32, 32, 3, 3),
        ("Conv2d_2b_3x3", 32, 64, 3, 3),
        ("Conv2d_3b_1x1", 64, 80, 1, 1),
        ("Conv2d_4a_3x3", 80, 192, 3, 3),
    ]
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [
            (f"{name}.branch1x1", cin, 64, 1, 1),
            (f"{name}.branch5x5_1", cin, 48, 1, 1),
            (f"{name}.branch5x5_2", 48, 64, 5, 5),
            (f"{name}.branch3x3dbl_1", cin, 64, 1, 1),
            (f"{name}.branch3x3dbl_2", 64, 96, 3, 3),
            (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
            (f"{name}.branch_pool", cin, pool, 1, 1),
        ]
    convs += [
        ("Mixed_6a.branch3x3", 288, 384, 3, 3),
        ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
        ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
        ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    ]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [
            (f"{name}.branch1x1", 768, 192, 1, 1),
            (f"{name}.branch7x7_1", 768, c7, 1, 1),
            (f"{name}.branch7x7_2", c7, c7, 1, 7),
            (f"{name}.branch7x7_3", c7, 192, 7, 1),
            (f"{name}.branch7x7dbl_1", 768, c7, 1, 1),
            (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_3", c7, c7, 1, 7),
            (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_5", c7, 192, 1, 7),
            (f"{name}.branch_pool", 768, 192, 1, 1),
        ]
    convs += [
        ("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
        ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
        ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
        ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    ]
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [
            (f"{name}.branch1x1", cin, 320, 1, 1),
            (f"{name}.branch3x3_1", cin, 384, 1, 1),
            (f"{name}.branch3x3_2a", 384, 384, 1, 3),
            (f"{name}.branch3x3_2b", 384, 384, 3, 1),
            (f"{name}.branch3x3dbl_1", cin, 448, 1, 1),
            (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
            (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3),
            (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
            (f"{name}.branch_pool", cin, 192, 1, 1),
        ]
    return convs


def _random_fid_state_dict(seed: int) -> dict[str, np.ndarray]:
    """pytorch-fid's key names and torch shapes, He-scaled random weights."""
    rng = np.random.default_rng(seed)
    state = {}
    for prefix, cin, cout, kh, kw in _fid_inception_convs():
        scale = np.sqrt(2.0 / (cin * kh * kw))
        weight = rng.standard_normal((cout, cin, kh, kw), dtype=np.float32) * scale
        state[f"{prefix}.conv.weight"] = weight.astype(np.float32)
        state[f"{prefix}.bn.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        state[f"{prefix}.bn.bias"] = 0.1 * rng.standard_normal(cout, dtype=np.float32)
        state[f"{prefix}.bn.running_mean"] = 0.1 * rng.standard_normal(cout, dtype=np.float32)
        state[f"{prefix}.bn.running_var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        state[f"{prefix}.bn.num_batches_tracked"] = np.array(0, dtype=np.int64)
    fc_weight = rng.standard_normal((1008, 2048), dtype=np.float32) / np.sqrt(2048)
    state["fc.weight"] = fc_weight.astype(np.float32)
    state["fc.bias"] = rng.standard_normal(1008, dtype=np.float32)
    return state


@pytest.fixture(scope="module")
def torch_state() -> dict[str, np.ndarray]:
    return _random_fid_state_dict(0)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, torch_state):
    path = tmp_path_factory.mktemp("weights") / FID_WEIGHTS_FILENAME
    save_torch_state_dict(torch_state, path)
    return path


@pytest.fixture(scope="module")
def params(weights_file):
    return load_inception_params(weights_file)


@pytest.fixture(scope="module")
def forward():
    """Jitted (state, x) -> (pool3, logits with fc bias); swapping states does not recompile."""
    graphdef = nnx.graphdef(InceptionV3(nnx.Rngs(0), kernel_init=inc._host_zeros))
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, logits_bias=True))


@pytest.fixture(scope="module")
def small_images() -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, (2, 75, 75, 3)).astype(np.float32)


def test_key_table_has_pytorch_fids_size(torch_state):
    assert len(torch_state) == 566
    assert {a.dtype for a in torch_state.values()} == {np.dtype(np.float32), np.dtype(np.int64)}
    assert sum(a.size for a in torch_state.values()) == 23_885_486


def test_loader_fills_every_parameter_from_the_file(params, torch_state):
    flat = list(nnx.to_flat_state(params))
    assert len(flat) == 94 * 5 + 2  # every conv kernel, BN scale/bias/mean/var, fc
    torch_names = {"scale": "weight", "mean": "running_mean", "var": "running_var"}
    for path, variable in flat:
        *prefix, leaf = (str(p) for p in path)
        value = np.asarray(variable.get_value())
        assert value.dtype == np.float32
        if leaf == "kernel":
            want = torch_state[".".join([*prefix, "weight"])]
            want = want.transpose(2, 3, 1, 0) if want.ndim == 4 else want.T
        else:
            want = torch_state[".".join([*prefix, torch_names.get(leaf, leaf)])]
        np.testing.assert_array_equal(value, want, err_msg=".".join(map(str, path)))


def test_forward_shapes_and_loaded_weights(params, torch_state, forward, small_images):
    pool3, logits = forward(params, small_images)
    assert pool3.shape == (2, 2048) and pool3.dtype == jnp.float32
    assert logits.shape == (2, 1008)
    pool3, logits = np.asarray(pool3, np.float64), np.asarray(logits, np.float64)
    assert np.isfinite(pool3).all() and (pool3 >= 0).all() and pool3.std() > 0
    # the logits are the file's fc layer applied to pool3 (orientation of fc.weight)
    want = pool3 @ torch_state["fc.weight"].T.astype(np.float64) + torch_state["fc.bias"]
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    # other weights -> other features; a BN bias of Mixed_7c's pool branch moves only the
    # last 192 pool3 channels (the branch order of the concatenation, 320 + 768 + 768 + 192)
    changed = dict(torch_state)
    changed["Mixed_7c.branch_pool.bn.bias"] = torch_state["Mixed_7c.branch_pool.bn.bias"] + 1.0
    pool3_b, _ = forward(params_from_state_dict(changed), small_images)
    pool3_b = np.asarray(pool3_b, np.float64)
    np.testing.assert_array_equal(pool3_b[:, :1856], pool3[:, :1856])
    delta = pool3_b[:, 1856:] - pool3[:, 1856:]  # relu(z + 1) - relu(z), 1x1 final map at 75
    assert (delta >= 0).all() and (delta > 0).mean() > 0.5
    np.testing.assert_allclose(delta[pool3[:, 1856:] > 0], 1.0, atol=1e-4)
    zero_kernels = nnx.state(InceptionV3(nnx.Rngs(0), kernel_init=inc._host_zeros))
    pool3_z, _ = forward(zero_kernels, small_images)
    assert not np.allclose(np.asarray(pool3_z), pool3)


def test_make_feature_fn_sharded_matches_direct_forward(params, forward, devices):
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    mesh = jax.make_mesh((4, 2), ("data", "model"))  # batch over "data", padded 2 -> 4
    feature_fn = make_feature_fn(params, mesh, size=75)
    pool3, logits = feature_fn(images)
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
    want_pool3, _ = forward(params, preprocess(images, 75))
    np.testing.assert_allclose(pool3, np.asarray(want_pool3), rtol=1e-5, atol=1e-5)
    # default logits are the unbiased ones of the IS reference: pool3 @ W
    kernel = np.asarray(params["fc"]["kernel"].get_value(), np.float64)
    np.testing.assert_allclose(logits, pool3 @ kernel, rtol=1e-4, atol=1e-4)
    sharded_pool3, _ = feature_fn.forward(feature_fn.params, np.concatenate([images, images]))
    assert sharded_pool3.sharding.spec == jax.sharding.PartitionSpec("data")
    assert len(sharded_pool3.addressable_shards) == 8


def _torch_bilinear_reference(image: np.ndarray, out: int) -> np.ndarray:
    """Scalar loop of torch's upsample_bilinear2d (align_corners=False) for [H, W, C]."""
    h, w, _ = image.shape

    def source(i: int, size_in: int) -> tuple[int, int, float]:
        real = max((i + 0.5) * size_in / out - 0.5, 0.0)
        lo = int(real)
        return lo, lo + (1 if lo < size_in - 1 else 0), real - lo

    result = np.zeros((out, out, image.shape[2]))
    for i in range(out):
        y0, y1, ly = source(i, h)
        for j in range(out):
            x0, x1, lx = source(j, w)
            result[i, j] = (1 - ly) * ((1 - lx) * image[y0, x0] + lx * image[y0, x1]) + ly * (
                (1 - lx) * image[y1, x0] + lx * image[y1, x1]
            )
    return result


@pytest.mark.parametrize("size_in", [7, 50])
def test_preprocess_resizes_like_torch_and_scales_to_unit_range(size_in):
    images = np.random.default_rng(3).integers(0, 256, (1, size_in, size_in, 3), dtype=np.uint8)
    got = np.asarray(preprocess(images, 23))
    want = _torch_bilinear_reference(images[0].astype(np.float64) / 127.5 - 1.0, 23)
    np.testing.assert_allclose(got[0], want, atol=2e-6)
    full = preprocess(np.array([[[[0, 255, 128]]]], dtype=np.uint8).repeat(5, 1).repeat(5, 2))
    assert full.shape == (1, 299, 299, 3)
    np.testing.assert_allclose(np.asarray(full[0, 0, 0]), [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)
    floats = np.random.default_rng(4).uniform(-1, 1, (1, 299, 299, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(preprocess(floats)), floats)  # no-op at 299


def test_weight_mismatches_are_named_with_shapes(torch_state):
    bad = dict(torch_state)
    del bad["Mixed_6b.branch7x7_2.conv.weight"]
    bad["Mixed_5b.branch1x1.bn.running_var"] = np.ones(65, np.float32)
    bad["Conv2d_1a_3x3.conv.weight"] = np.ones((32, 3, 3, 3, 1), np.float32)
    bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    with pytest.raises(ValueError) as err:
        params_from_state_dict(bad)
    message = str(err.value)
    assert "Mixed_6b.branch7x7_2.conv.weight (needs (128, 128, 1, 7))" in message
    assert "Mixed_5b.branch1x1.bn.running_var: file (65,), needs (64,)" in message
    assert "Conv2d_1a_3x3.conv.weight: file (32, 3, 3, 3, 1), needs (32, 3, 3, 3)" in message
    assert "'AuxLogits.fc.weight': (1000, 768)" in message


def test_weights_file_with_foreign_global_is_rejected(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / FID_WEIGHTS_FILENAME
    save_torch_object({"fc.bias": ForeignCall("os", "system", (f"touch {marker}",))}, path)
    with pytest.raises(ValueError, match=r"os\.system"):
        load_inception_params(path)
    assert not marker.exists()


def _no_network(url, destination):
    raise OSError(f"network disabled in tests ({url})")


def test_offline_without_file_raises_a_helpful_error(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(cache))
    monkeypatch.delenv("DIFFUSION_JAX_OFFLINE", raising=False)
    with pytest.raises(InceptionWeightsUnavailable) as err:
        inception_weights_path(download=_no_network)
    message = str(err.value)
    assert str(cache / FID_WEIGHTS_FILENAME) in message
    assert FID_WEIGHTS_URL in message and "network disabled" in message
    assert isinstance(err.value, errors.UserError)
    assert list(cache.iterdir()) == []  # no partial download left behind

    monkeypatch.setenv("DIFFUSION_JAX_OFFLINE", "1")  # the env switch skips any download

    def must_not_download(url, destination):
        raise AssertionError("download attempted while offline")

    with pytest.raises(InceptionWeightsUnavailable, match="downloads are disabled"):
        inception_weights_path(download=must_not_download)
    with pytest.raises(InceptionWeightsUnavailable, match="no file at the given path"):
        inception_weights_path(str(tmp_path / "missing.pth"))


def test_explicit_cached_and_downloaded_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DIFFUSION_JAX_OFFLINE", raising=False)
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"x")
    assert inception_weights_path(str(explicit), download=_no_network) == explicit

    payload = b"pretend weights"
    calls = []

    def fake_download(url, destination):
        calls.append(url)
        destination.write_bytes(payload)

    with pytest.raises(InceptionWeightsUnavailable, match="sha256"):  # wrong hash: refused
        inception_weights_path(download=fake_download)
    assert list((tmp_path / "cache").iterdir()) == []

    digest = hashlib.sha256(payload).hexdigest()
    monkeypatch.setattr(inception_weights, "FID_WEIGHTS_SHA256_PREFIX", digest[:8])
    path = inception_weights_path(download=fake_download)
    assert path == tmp_path / "cache" / FID_WEIGHTS_FILENAME
    assert path.read_bytes() == payload and calls == [FID_WEIGHTS_URL] * 2
    assert inception_weights_path(download=_no_network) == path  # cached: no download
