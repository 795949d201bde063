"""Tests of diffusion_jax.input_pipeline: shapes, ranges, determinism, resumption, host
sharding, the tfds (mocked) and TFRecord paths, offline errors and bad configs. No network."""

import gc
import io
import itertools
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from configs.base import get_base_config
from diffusion_jax import input_pipeline as ip
from diffusion_jax.input_pipeline import prepare
from diffusion_jax.runtime import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------


def make_config(name="digits", batch_size=32, seed=0, **data):
    config = get_base_config()
    config.seed = seed
    config.training.batch_size = batch_size
    config.data.name = name
    config.data.prefetch = 0
    if name == "digits":
        config.data.image_size = 16
        config.data.channels = 1
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def take(config, n, **kwargs):
    it = ip.create_train_iterator(config, **kwargs)
    try:
        return list(itertools.islice(it, n))
    finally:
        if hasattr(it, "close"):
            it.close()


def avg_pool2(images):
    """[N, 16, 16] -> [N, 8, 8] by 2x2 averaging."""
    n, h, w = images.shape
    return images.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_tfrecord(path, examples):
    """Writes dicts {key: bytes | list[int] | int} as tf.train.Examples."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for ex in examples:
            feature = {}
            for key, value in ex.items():
                if isinstance(value, bytes):
                    feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
                else:
                    ints = list(np.atleast_1d(value))
                    feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=ints))
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())


def random_images(n, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def lsun_dir(tmp_path_factory):
    """Two TFRecord files, 7 + 7 encoded 20x24 PNG images, label = record id."""
    root = tmp_path_factory.mktemp("lsun")
    images = random_images(14, 20, 24, seed=0)
    for f in range(2):
        ids = range(7 * f, 7 * f + 7)
        examples = [{"image": png_bytes(images[i]), "label": i} for i in ids]
        write_tfrecord(root / f"bed-train.tfrecord-{f:05d}-of-00002", examples)
    return root, images


def lsun_config(root, batch_size=4, **data):
    kwargs = dict(image_size=16, data_dir=str(root), tfrecord_pattern="bed-{split}.tfrecord*")
    kwargs.update(data)
    return make_config("lsun_bedroom", batch_size=batch_size, **kwargs)


# ---------------------------------------------------------------------------------------------
# digits.
# ---------------------------------------------------------------------------------------------


def test_digits_batch_shapes_dtype_range():
    config = make_config(batch_size=32, prefetch=2)
    for batch in take(config, 3):
        assert batch["image"].shape == (32, 16, 16, 1)
        assert batch["image"].dtype == np.float32
        assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert set(batch["label"].tolist()) <= set(range(10))


def test_digits_three_channels_tiled():
    config = make_config(batch_size=8, channels=3)
    image = take(config, 1)[0]["image"]
    assert image.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_digits_recognisable_and_labels_match():
    sk = load_digits()
    images, labels = ip.load_digits_arrays(16)
    assert images.shape == (1797, 16, 16, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, sk.target)
    reference = sk.images * (255.0 / 16.0)
    pooled = avg_pool2(images[..., 0].astype(np.float64))
    # Mean images agree (bilinear up then 2x2 average down is nearly the identity).
    assert np.corrcoef(pooled.mean(0).ravel(), reference.mean(0).ravel())[0, 1] > 0.99
    assert np.abs(pooled.mean(0) - reference.mean(0)).max() < 25.0
    # Batches from the iterator keep each image with its label: nearest class mean classifies.
    centroids = np.stack([reference[sk.target == k].mean(0).ravel() for k in range(10)])
    batch = take(make_config(batch_size=256, random_flip=False), 1)[0]
    x = avg_pool2((batch["image"][..., 0] + 1.0) * 127.5).reshape(256, -1)
    predicted = np.argmin(((x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == batch["label"]).mean() > 0.85


def test_flips_about_half_when_on_never_when_off():
    plain = take(make_config(batch_size=64, random_flip=False), 8)
    flipped = take(make_config(batch_size=64, random_flip=True), 8)
    n_flipped = n_total = 0
    for a, b in zip(plain, flipped, strict=True):
        np.testing.assert_array_equal(a["label"], b["label"])
        for x, y in zip(a["image"], b["image"], strict=True):
            if np.array_equal(x, x[:, ::-1]):
                continue  # Symmetric image: a flip is invisible.
            is_same = np.array_equal(x, y)
            assert is_same or np.array_equal(x[:, ::-1], y)
            n_flipped += not is_same
            n_total += 1
    assert 0.4 < n_flipped / n_total < 0.6
    off = take(make_config(batch_size=64, random_flip=False), 8)
    for a, b in zip(plain, off, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


# ---------------------------------------------------------------------------------------------
# Determinism, resumption, epochs, host sharding (in-memory path).
# ---------------------------------------------------------------------------------------------


def test_resume_gives_identical_batches_across_epoch_boundary():
    config = make_config(batch_size=64, random_flip=True)  # 1797 / 64: epoch ends in step 28.
    config.data.prefetch = 2
    from_zero = take(config, 60)
    for s in (0, 5, 27, 28, 29, 57):
        resumed = take(config, 2, start_step=s)
        for k in range(2):
            np.testing.assert_array_equal(resumed[k]["image"], from_zero[s + k]["image"])
            np.testing.assert_array_equal(resumed[k]["label"], from_zero[s + k]["label"])


def test_seeds_change_the_order():
    a = take(make_config(batch_size=64, seed=0), 1)[0]
    b = take(make_config(batch_size=64, seed=1), 1)[0]
    assert not np.array_equal(a["label"], b["label"])
    c = take(make_config(batch_size=64, seed=0), 1)[0]
    np.testing.assert_array_equal(a["image"], c["image"])


def test_every_example_once_per_epoch_indices():
    n, batch = 1797, 64
    idx = np.concatenate([ip.global_batch_indices(3, s, batch, n) for s in range(57)])
    for epoch in range(2):
        np.testing.assert_array_equal(np.sort(idx[epoch * n : (epoch + 1) * n]), np.arange(n))
    assert not np.array_equal(idx[:n], idx[n : 2 * n])


def test_every_example_once_per_epoch_swissroll_end_to_end():
    config = make_config("swissroll", batch_size=500)
    points = np.concatenate([b["image"] for b in take(config, 20)])  # One epoch of 10,000.
    reference = ip.make_swissroll()
    rows = {tuple(r) for r in points.tolist()}
    assert len(rows) == len(reference) == len(points)
    assert rows == {tuple(r) for r in reference.tolist()}


def test_digits_label_histogram_per_epoch():
    batches = take(make_config(batch_size=599), 3)  # 3 * 599 = 1797: exactly one epoch.
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(
        np.bincount(labels, minlength=10), np.bincount(load_digits().target)
    )


def test_two_hosts_split_the_global_batch_exactly():
    config = make_config(batch_size=64, random_flip=True)
    single = take(config, 30)
    hosts = [take(config, 30, process_index=h, process_count=2) for h in range(2)]
    for s in range(30):
        for key in ("image", "label"):
            assert hosts[0][s][key].shape[0] == 32
            joined = np.concatenate([hosts[0][s][key], hosts[1][s][key]])
            np.testing.assert_array_equal(joined, single[s][key])
    # Disjoint within a step: the two hosts' dataset indices never overlap.
    idx = ip.global_batch_indices(0, 28, 64, 1797)  # A batch straddling the epoch boundary.
    assert not set(idx[:32].tolist()) & set(idx[32:].tolist())


# ---------------------------------------------------------------------------------------------
# swissroll.
# ---------------------------------------------------------------------------------------------


def test_swissroll_shape_and_range():
    batch = take(make_config("swissroll", batch_size=128, random_flip=True), 1)[0]
    assert batch["image"].shape == (128, 2) and batch["image"].dtype == np.float32
    assert np.abs(batch["image"]).max() < 1.3
    np.testing.assert_array_equal(batch["label"], np.zeros(128, np.int32))
    test = ip.load_arrays(make_config("swissroll"), "test")[0]
    assert test.shape == (10_000, 2) and not np.array_equal(test, ip.make_swissroll())


# ---------------------------------------------------------------------------------------------
# Evaluation arrays.
# ---------------------------------------------------------------------------------------------


def test_eval_arrays_digits_sharded_in_order():
    config = make_config()
    batches = list(ip.create_eval_arrays(config, "test", 100, batch_size=32))
    assert [len(b["image"]) for b in batches] == [32, 32, 32, 4]
    assert batches[0]["image"].dtype == np.uint8 and batches[0]["image"].shape[1:] == (16, 16, 1)
    all_images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(all_images, ip.load_digits_arrays(16)[0][:100])
    hosts = [
        np.concatenate(
            [
                b["image"]
                for b in ip.create_eval_arrays(
                    config, "test", 100, batch_size=32, process_index=h, process_count=2
                )
            ]
        )
        for h in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(hosts), all_images)


# ---------------------------------------------------------------------------------------------
# cifar10 through tfds (mocked data: no download).
# ---------------------------------------------------------------------------------------------


def test_cifar10_through_mocked_tfds(tmp_path):
    import tensorflow_datasets as tfds

    config = make_config("cifar10", batch_size=16, data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=40):
        batches = take(config, 6)
        resumed = take(config, 2, start_step=2)  # Steps 2, 3: the second straddles epoch 1.
        eval_batches = list(ip.create_eval_arrays(config, "test", 30, batch_size=16))
    for b in batches:
        assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert b["label"].dtype == np.int32 and set(b["label"].tolist()) <= set(range(10))
    for k in range(2):
        np.testing.assert_array_equal(resumed[k]["image"], batches[2 + k]["image"])
        np.testing.assert_array_equal(resumed[k]["label"], batches[2 + k]["label"])
    assert [len(b["image"]) for b in eval_batches] == [16, 14]
    assert eval_batches[0]["image"].dtype == np.uint8
    assert eval_batches[0]["image"].shape[1:] == (32, 32, 3)


def test_celeb_a_hq_through_mocked_tfds(tmp_path):
    import tensorflow_datasets as tfds

    config = make_config("celeb_a_hq", batch_size=4, image_size=16, data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=6):  # 256x256 encoded images, resized to 16.
        batches = take(config, 4)
        resumed = take(config, 2, start_step=1)  # Step 1 straddles the epoch boundary.
        eval_batches = list(ip.create_eval_arrays(config, "train", 5, batch_size=4))
    for b in batches:
        assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        np.testing.assert_array_equal(b["label"], np.zeros(4, np.int32))
    for k in range(2):
        np.testing.assert_array_equal(resumed[k]["image"], batches[1 + k]["image"])
    assert [b["image"].shape for b in eval_batches] == [(4, 16, 16, 3), (1, 16, 16, 3)]
    assert eval_batches[0]["image"].dtype == np.uint8


def test_cifar10_offline_raises_quickly(tmp_path):
    config = make_config("cifar10", data_dir=str(tmp_path))
    start = time.time()
    with pytest.raises(ip.DatasetUnavailableError) as err:
        ip.create_train_iterator(config)
    assert time.time() - start < 20
    message = str(err.value)
    assert "cifar10" in message and str(tmp_path) in message
    assert "--prepare cifar10" in message
    assert isinstance(err.value, errors.UserError)


# ---------------------------------------------------------------------------------------------
# LSUN-style TFRecords.
# ---------------------------------------------------------------------------------------------


def test_lsun_tfrecords_shapes_resume_and_epochs(lsun_dir):
    root, _ = lsun_dir
    config = lsun_config(root, batch_size=4)
    batches = take(config, 7)  # 28 positions: two epochs of 14.
    for b in batches:
        assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(np.sort(labels[:14]), np.arange(14))
    np.testing.assert_array_equal(np.sort(labels[14:]), np.arange(14))
    assert not np.array_equal(labels[:14], labels[14:])  # Each epoch is reshuffled.
    for s in (1, 3, 4):  # Step 3 straddles the epoch boundary (positions 12..15).
        resumed = take(config, 2, start_step=s)
        for k in range(2):
            np.testing.assert_array_equal(resumed[k]["image"], batches[s + k]["image"])
            np.testing.assert_array_equal(resumed[k]["label"], batches[s + k]["label"])
    other = lsun_config(root, batch_size=4)
    other.seed = 5
    other_labels = np.concatenate([b["label"] for b in take(other, 3)])
    assert not np.array_equal(other_labels, labels[:12])


def test_lsun_two_hosts_disjoint_shards(lsun_dir):
    root, _ = lsun_dir
    config = lsun_config(root, batch_size=4)
    per_host = [
        np.concatenate([b["label"] for b in take(config, 7, process_index=h, process_count=2)])
        for h in range(2)
    ]
    for labels in per_host:  # Each host: 7 records per epoch, each once, over two epochs.
        assert len(set(labels[:7].tolist())) == 7 and set(labels[:7]) == set(labels[7:14])
    assert not set(per_host[0].tolist()) & set(per_host[1].tolist())
    assert set(per_host[0].tolist()) | set(per_host[1].tolist()) == set(range(14))


def test_lsun_eval_arrays_stored_order(lsun_dir):
    root, images = lsun_dir
    config = lsun_config(root, image_size=20)  # 20x24 crops to 20x20: no resize.
    batches = list(ip.create_eval_arrays(config, "train", 10, batch_size=4))
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(10))
    got = np.concatenate([b["image"] for b in batches])
    assert got.dtype == np.uint8 and got.shape == (10, 20, 20, 3)
    np.testing.assert_array_equal(got, images[:10, :, 2:22])


def test_tfrecord_pggan_raw_layout(tmp_path):
    images = random_images(5, 8, 8, seed=1)
    examples = [
        {"data": np.ascontiguousarray(x.transpose(2, 0, 1)).tobytes(), "shape": [3, 8, 8]}
        for x in images
    ]
    write_tfrecord(tmp_path / "cat-train.tfrecord", examples)
    config = make_config(
        "lsun_cat", image_size=8, data_dir=str(tmp_path), tfrecord_pattern="cat-train.tfrecord"
    )
    got = np.concatenate(
        [b["image"] for b in ip.create_eval_arrays(config, "train", 0, batch_size=256)]
    )
    np.testing.assert_array_equal(got, images)
    batch = take(config, 1)[0]
    assert batch["image"].shape == (32, 8, 8, 3)


def test_prepare_cli_writes_readable_tfrecords(tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    for i, x in enumerate(random_images(3, 30, 40, seed=2)):
        Image.fromarray(x).save(source / f"{i}.jpg")
    out = tmp_path / "out"
    rc = prepare.main(
        [
            "--prepare",
            "lsun_church",
            "--source_dir",
            str(source),
            "--data_dir",
            str(out),
            "--image_size",
            "12",
            "--num_shards",
            "2",
        ]
    )
    assert rc == 0
    config = make_config("lsun_church", batch_size=2, image_size=12, data_dir=str(out))
    batch = take(config, 1)[0]
    assert batch["image"].shape == (2, 12, 12, 3)


def test_lsun_missing_files_raises(tmp_path):
    config = make_config("lsun_bedroom", data_dir=str(tmp_path))
    with pytest.raises(ip.DatasetUnavailableError, match="lsun_bedroom") as err:
        ip.create_train_iterator(config)
    assert str(tmp_path) in str(err.value) and "--prepare lsun_bedroom" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Bad configs and the prefetch thread.
# ---------------------------------------------------------------------------------------------


def test_module_imports_without_tensorflow():
    code = (
        "import sys, diffusion_jax.input_pipeline, diffusion_jax.input_pipeline.__main__; "
        "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_prepare_command_line_names_what_needs_no_preparation():
    out = subprocess.run(
        [sys.executable, "-m", "diffusion_jax.input_pipeline", "--prepare", "digits"],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    assert "digits is built in and needs no preparation." in out


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="data.name") as err:
        ip.create_train_iterator(make_config("imagenet"))
    assert "imagenet" in str(err.value) and "cifar10" in str(err.value)


def test_batch_not_divisible_by_process_count():
    with pytest.raises(ValueError, match="training.batch_size"):
        ip.create_train_iterator(make_config(batch_size=30), process_count=4)


def test_prefetch_reraises_and_stops():
    def failing():
        yield 1
        raise KeyError("boom")

    it = ip.PrefetchIterator(failing, 2)
    assert next(it) == 1
    with pytest.raises(KeyError, match="boom"):
        next(it)

    it = ip.PrefetchIterator(lambda: itertools.count(), 2)
    assert next(it) == 0
    it.close()
    it._thread.join(timeout=5)
    assert not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)

    it = ip.PrefetchIterator(lambda: itertools.count(), 2)
    thread = it._thread
    assert next(it) == 0 and thread.daemon
    del it
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()  # Stopped once the iterator was garbage collected.


def test_shuffle_buffer_is_a_declared_config_field_that_reaches_the_stream(monkeypatch):
    """`--config.data.shuffle_buffer=N` works (a locked config, as config_flags builds it,
    accepts only declared fields) and is the buffer the streamed source shuffles with."""
    config = get_base_config()
    config.lock()
    config.data.name, config.data.shuffle_buffer = "lsun_church", 123
    seen = []
    monkeypatch.setattr(
        ip.sources.tfrecords, "tfrecord_source", lambda *args: seen.append(args[-1])
    )
    ip.sources.stream_source(config, "train", 0, 1)
    assert seen == [123]
