"""The evaluation job and sample mode (evaluation/job.py, evaluation/sample_job.py) on a
tiny digits model.

A module-scoped fixture writes three checkpoints (steps 1, 2, 3) of a tiny U-Net (ch 8, one
level, T = 20) with random weights; every test works on its own copy of that workdir. The
Inception network is never built: FID/IS are either skipped (offline, no weights) or fed by
a small fake feature function.
"""

import dataclasses
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import DAMAGE
from jax.experimental.compilation_cache import compilation_cache
from PIL import Image

from configs.digits import get_config
from diffusion_jax import input_pipeline
from diffusion_jax.evaluation import base, bpd, evaluators, job, pictures, quality, sample_job
from diffusion_jax.evaluation import fid as fid_eval
from diffusion_jax.metrics import frechet
from diffusion_jax.runtime import distributed, errors
from diffusion_jax.sampling import generation
from diffusion_jax.tools.convert import imported, mapping
from diffusion_jax.training import checkpoint
from diffusion_jax.training import state as state_lib

PNG_KINDS = ("samples", "progressive", "rate_distortion", "interpolation")


def tiny_config():
    c = get_config()
    c.model.ch = 8
    c.model.ch_mult = (1,)
    c.model.attn_resolutions = ()
    c.model.num_groups = 4
    c.diffusion.num_timesteps = 20
    c.data.prefetch = 0
    c.training.batch_size = 8
    c.training.num_train_steps = 3
    c.training.warmup_steps = 1
    c.training.log_every = 1
    c.training.checkpoint_every = 1
    c.training.sample_every = 0
    c.training.final_samples = 0
    c.training.keep = 3
    c.training.keep_every = 0
    c.sampling.update(method="ancestral", num_steps=0, spacing="", denoise_to_zero=False)
    c.sampling.batch_size = 16
    c.sampling.num_samples = 40
    for name in ("bpd", "ode_bpd"):
        c.evals[name].batch_size = 16
        c.evals[name].num_examples = 16
    c.evals.fid.update(num_samples=32, batch_size=16, is_splits=2)
    c.evals.quality.num_samples = 32
    c.evals.samples.update(grid_num=8, progressive_steps=5, progressive_rows=4)
    c.evals.interpolation.update(timestep=10, pairs=2, lambdas=3)
    c.eval.poll_seconds = 0
    return c


@pytest.fixture(scope="module", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this module: each eval job or sampler run builds its jitted
    functions anew (as separate processes would), so later runs load them from the cache."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(names[1], 0)
    jax.config.update(names[2], 0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def random_params(abstract_params, seed):
    """Random weights for the model's parameter shapes (unit-variance fan-in scaling)."""
    rng = np.random.default_rng(seed)
    flat = mapping.flatten_params(abstract_params.to_pure_dict())
    out = {}
    for name, s in flat.items():
        if name.endswith("scale"):
            out[name] = np.ones(s.shape, np.float32)
        elif len(s.shape) > 1:
            fan_in = int(np.prod(s.shape[:-1]))
            out[name] = (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
        else:
            out[name] = (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    return mapping.unflatten_params(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir as training leaves it: config.json and checkpoints at steps 1, 2, 3 (full
    TrainStates with distinct random weights: an untrained model is enough for every check
    below, and skips compiling a training step)."""
    config = tiny_config()
    workdir = tmp_path_factory.mktemp("trained")
    _, _, abstract = state_lib.abstract_train_state(config, distributed.make_mesh())
    mngr = checkpoint.manager(workdir / "checkpoints")
    for step in (1, 2, 3):
        state = imported.train_state_from_params(config, random_params(abstract.params, step))
        checkpoint.save(mngr, step, state.replace(step=np.int32(step)))
    mngr.wait_until_finished()
    mngr.close()
    checkpoint.write_config(workdir, config)
    return workdir


@pytest.fixture
def workdir(trained, tmp_path, monkeypatch):
    """A private copy of the trained workdir; no Inception weights reachable."""
    monkeypatch.setenv("DIFFUSION_JAX_OFFLINE", "1")
    monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path / "cache"))
    return shutil.copytree(trained, tmp_path / "workdir")


def fake_feature_fn(images):
    """A fixed random projection of uint8 RGB NHWC images: pool3 [B, 16], logits [B, 10]."""
    assert images.dtype == np.uint8 and images.shape[-1] == 3
    rng = np.random.default_rng(0)
    flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
    pool3 = flat @ rng.standard_normal((flat.shape[1], 16))
    return pool3, pool3 @ rng.standard_normal((16, 10)) / 4.0


def read_lines(workdir):
    return [
        json.loads(line) for line in (workdir / "eval" / "metrics.jsonl").read_text().splitlines()
    ]


def test_eval_job_evaluates_each_checkpoint_once_across_restarts(workdir, capsys):
    """once=True does the latest; a restarted watcher does the other two and stops at
    num_train_steps; a third start finds nothing to do. FID/IS are skipped with one notice
    (offline, no weights); bits/dim and the four PNGs are there for every checkpoint."""
    config = tiny_config()
    config.eval.once = True
    first = job.evaluate_checkpoints(config, workdir)
    assert [r["step"] for r in first] == [3]
    config.eval.once = False
    second = job.evaluate_checkpoints(config, workdir)
    assert [r["step"] for r in second] == [1, 2]
    out = capsys.readouterr().out
    notices = [line for line in out.splitlines() if "FID/IS skipped:" in line]
    assert len(notices) == 2  # one line per job start, naming the way out
    assert all("--config.evals.fid.inception_weights=" in line for line in notices)
    assert "$DIFFUSION_JAX_CACHE" not in out and "Traceback" not in out
    third = job.evaluate_checkpoints(config, workdir)
    assert third == []
    assert "Evaluating" not in capsys.readouterr().out

    lines = read_lines(workdir)
    assert sorted(r["step"] for r in lines) == [1, 2, 3]
    for r in lines:
        assert math.isfinite(r["bpd"]) and r["bpd"] > 0
        assert r["bpd"] == pytest.approx(r["bpd_rate"] + r["bpd_distortion"], rel=1e-4)
        assert r["bpd_num_examples"] == 16
        assert r["fid"] is None and r["is"] is None and "weights" in r["fid_skipped"]
        for kind in PNG_KINDS:
            with Image.open(workdir / "eval" / f"{kind}_{r['step']:08d}.png") as img:
                img.verify()
                assert img.format == "PNG"
    assert list((workdir / "eval").glob("events.out.tfevents.*"))


def test_bpd_is_finite_and_above_the_entropy_bound(workdir):
    """For any model, the expected NLL of data is at least the data's entropy (Gibbs), and
    the variational bound is above the NLL (DDPM eq. 3, 5). i.i.d. uniform 8-bit pixels have
    entropy exactly 8 bits/dim, so the bound of any model (here an untrained one, which does
    not depend on the data drawn) on them must exceed 8; on 16
    distinct digits (the uniform distribution over them has entropy log2(16) / 64 bits/dim)
    it must exceed 1/16 and be finite. Rate + distortion add up to the total and the rate
    curve of §4.3 falls from the full rate to the prior term along the timesteps."""
    config = tiny_config()
    mesh = distributed.make_mesh()
    graphdef, rest, abstract = state_lib.abstract_train_state(config, mesh)
    params = checkpoint.restore_step(workdir, 3, abstract).ema_params
    bpd_fn = bpd.make_bpd_fn(
        config, generation.model_apply(graphdef, rest), mesh, precision="highest"
    )

    def bpd_of(images):
        batches = [{"image": images, "label": np.zeros(len(images), np.int32)}]
        padded = base.padded_batches(batches, 16, images.shape[1:])
        return bpd.compute_bpd(bpd_fn, params, padded, mesh, jax.random.PRNGKey(0))

    noise = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    assert bpd_of(noise)["bpd"] > 8.0

    digits = next(iter(input_pipeline.create_eval_arrays(config, "test", 16, batch_size=16)))
    assert len({img.tobytes() for img in digits["image"]}) == 16
    result = bpd_of(digits["image"])
    assert np.isfinite(result["bpd"]) and result["bpd"] > math.log2(16) / 64
    assert result["bpd"] == pytest.approx(result["bpd_rate"] + result["bpd_distortion"], rel=1e-5)
    rate = result["rate"]
    assert rate.shape == (20,) and rate[0] == pytest.approx(result["bpd_rate"])
    assert np.all(np.diff(rate) <= 1e-6) and rate[-1] == pytest.approx(result["bpd_prior"])

    # Padding rows (mask 0) do not count: 12 real rows padded to 16 give their own mean.
    part = [{"image": digits["image"][:12], "label": digits["label"][:12]}]
    padded = base.padded_batches(part, 16, (8, 8, 1))
    assert bpd.compute_bpd(bpd_fn, params, padded, mesh, jax.random.PRNGKey(0))["count"] == 12


def test_likelihoods_run_a_float32_network_when_the_model_computes_in_bfloat16(workdir):
    """With `model.dtype=bfloat16`, bits/dim at precision 'highest' equal the float32 run's
    exactly (the evaluation job gives the likelihoods a float32 network); at 'default' they
    run the bfloat16 network and differ."""
    records = {}
    for dtype, precision in (
        ("float32", "highest"),
        ("bfloat16", "highest"),
        ("bfloat16", "default"),
    ):
        config = tiny_config()
        config.model.dtype = dtype
        config.evals.bpd.precision = precision
        config.eval.evaluators = ("bpd",)
        records[dtype, precision] = job.Job(config, workdir).evaluate(3)["bpd"]
    assert records["bfloat16", "highest"] == records["float32", "highest"]
    assert records["bfloat16", "default"] != records["float32", "highest"]


def test_sample_mode_resumes_without_touching_finished_shards(workdir, capsys):
    config = tiny_config()  # 40 samples in shards of 16: 3 shards
    config.sampling.max_shards = 2
    directory = sample_job.sample(config, workdir)
    assert directory == workdir / "samples" / "3"
    first = sorted(directory.glob("shard_*.npz"))
    assert [p.name for p in first] == ["shard_00000.npz", "shard_00001.npz"]
    assert not (directory / "grid.png").exists()
    assert "rerun to continue" in capsys.readouterr().out
    before = {p.name: (os.stat(p).st_mtime_ns, p.read_bytes()) for p in first}

    config.sampling.max_shards = 0
    sample_job.sample(config, workdir)
    shards = sorted(directory.glob("shard_*.npz"))
    assert len(shards) == 3 and not list(directory.glob(".*tmp*"))
    for name, (mtime, data) in before.items():
        assert os.stat(directory / name).st_mtime_ns == mtime
        assert (directory / name).read_bytes() == data
    samples = sample_job.load_samples(directory, 40)
    assert samples.shape == (40, 8, 8, 1) and samples.dtype == np.uint8
    assert len(np.unique(samples.reshape(40, -1), axis=0)) == 40
    with Image.open(directory / "grid.png") as img:
        img.verify()

    config.sampling.method = "ddim"  # other settings: resuming into this folder is refused
    with pytest.raises(errors.UserError, match="other settings"):
        sample_job.sample(config, workdir)


def test_fid_and_is_plumbing_with_a_fake_feature_function(workdir):
    """FID against cached training-set statistics, IS over the splits, and the sample shards
    they are computed from; the reference statistics of the data against themselves give
    FID 0 (up to rounding)."""
    config = tiny_config()
    shapes = []

    def features(images):
        shapes.append(images.shape)
        return fake_feature_fn(images)

    record = job.evaluate_checkpoint(
        config, workdir, 3, evaluator_options={"fid": {"feature_fn": features}}
    )
    # 1797 training digits in batches of 16 (the last padded), then 2 shards of 16 samples.
    assert set(shapes) == {(16, 8, 8, 3)} and len(shapes) == math.ceil(1797 / 16) + 2
    assert np.isfinite(record["fid"]) and record["fid"] >= 0
    assert record["fid_num_samples"] == 32
    assert np.isfinite(record["bpd"])

    samples = sample_job.load_samples(workdir / "eval" / "samples" / "3", 32)
    is_mean, is_std = frechet.inception_score(
        fake_feature_fn(np.repeat(samples, 3, -1))[1], splits=2
    )
    assert (record["is"], record["is_std"]) == pytest.approx((is_mean, is_std), rel=1e-6)

    fid = config.evals.fid
    reference = fid_eval.Reference("", fid.reference_split, 0, fid.batch_size)
    stats_path = reference.path(config)
    assert stats_path.name == "fid_stats_digits_train_8.npz" and stats_path.exists()
    mu, sigma = frechet.load_statistics(stats_path)
    assert mu.shape == (16,) and sigma.shape == (16, 16)

    expected = frechet.frechet_distance(
        *frechet.compute_statistics(fake_feature_fn(np.repeat(samples, 3, axis=-1))[0]), mu, sigma
    )
    assert record["fid"] == pytest.approx(expected, rel=1e-6)

    batches = input_pipeline.create_eval_arrays(config, "train", None, batch_size=256)
    data = np.concatenate([b["image"] for b in batches])
    self_fid = fid_eval.fid_and_inception_score(fake_feature_fn, [data], (mu, sigma), 2)
    assert abs(self_fid["fid"]) < 1e-6

    # A published statistics file named by the 'reference_stats' setting is used as is.
    published = dataclasses.replace(reference, stats=str(stats_path))
    assert published.path(config) == stats_path
    missing = dataclasses.replace(reference, stats=str(workdir / "missing.npz"))
    with pytest.raises(errors.UserError, match=r"config.evals.fid.reference_stats=.*no such"):
        fid_eval.reference_statistics(config, missing, fake_feature_fn, "config.evals.fid")


def test_picture_layouts():
    snaps = np.arange(3 * 5).reshape(3, 5, 1, 1, 1).astype(np.float32)  # [S, B, ...]
    images, ncol = pictures.progressive_strip(snaps, rows=2)
    assert ncol == 3 and images[:, 0, 0, 0].tolist() == [0, 5, 10, 1, 6, 11]
    a, b = np.zeros((2, 1, 1, 1)), np.ones((2, 1, 1, 1))
    mixed = np.full((3, 2, 1, 1, 1), 0.5)
    images, ncol = pictures.interpolation_grid(a, b, mixed)
    assert ncol == 5 and images[:, 0, 0, 0].tolist() == [0, 0.5, 0.5, 0.5, 1] * 2
    assert pictures.snapshot_every(1000, 10) == 111 and pictures.snapshot_every(20, 5) == 4


def test_class_conditional_model_trains_with_label_dropout_and_samples_guided(tmp_path, capsys):
    """A conditional network end to end: label dropout trains the null class, and the
    evaluation's sampler and --mode sample use classifier-free guidance with cycling labels."""
    from diffusion_jax.training import loop  # the training loop itself, as main.py runs it

    config = tiny_config()
    config.model.num_classes = 10
    config.diffusion.num_timesteps = 100  # a 100-step chain: 10x cheaper to sample
    config.training.label_dropout = 0.5
    config.training.num_train_steps = 3
    config.training.checkpoint_every = 3
    config.sampling.guidance_scale = 2.0
    config.sampling.num_samples = 16
    config.eval.evaluators = ("samples", "bpd")
    config.training.final_samples = 40
    workdir = tmp_path / "conditional"
    state = loop.train(config, workdir)
    # The run ends with its final grid and the quality of those samples beside the real floor.
    out = capsys.readouterr().out
    assert (workdir / "samples" / "final.png").exists() and "Final samples:" in out
    assert "Sample quality of 40: digits FD" in out and "real held-out digits" in out

    # The null class (row num_classes) is only ever seen through dropped labels.
    init = state_lib.init_train_state(config)[2].params.to_pure_dict()["class_embed"]["embedding"]
    trained = state.params.to_pure_dict()["class_embed"]["embedding"]
    assert np.abs(np.asarray(trained[10]) - np.asarray(init[10])).max() > 1e-4

    # The guided denoiser the samplers use is (1 + w) out(y) - w out(null).
    graphdef, rest, _ = state_lib.abstract_train_state(config, distributed.make_mesh())
    apply = generation.model_apply(graphdef, rest)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
    t, y = np.array([0, 5, 10, 19]), np.array([1, 3, 5, 7])
    guided = generation.denoise_fn(config, apply, state.ema_params, y)(x, t)
    cond = apply(state.ema_params, x, t, y)
    uncond = apply(state.ema_params, x, t, np.full(4, 10))
    np.testing.assert_allclose(guided, 3.0 * cond - 2.0 * uncond, rtol=1e-5, atol=1e-5)

    record = job.evaluate_checkpoint(config, workdir, 3)
    assert np.isfinite(record["bpd"]) and (workdir / "eval" / "samples_00000003.png").exists()
    with (sample_job.sample(config, workdir) / "shard_00000.npz").open("rb") as f:
        shard = np.load(f)
        np.testing.assert_array_equal(shard["label"], np.arange(16) % 10)
        assert np.isfinite(shard["image"]).all()


def test_ode_bpd_and_sample_quality_evaluators(workdir):
    """'ode_bpd' next to the bound, and 'quality' on the eval job's samples, as records."""
    config = tiny_config()
    config.eval.evaluators = ("bpd", "ode_bpd", "quality")
    config.evals.ode_bpd.update(num_steps=3, num_probes=2)
    record = job.evaluate_checkpoint(config, workdir, 3)
    assert record["ode_nfe"] == 12 and record["ode_num_examples"] == 16
    assert np.isfinite(record["ode_bpd"]) and record["ode_bpd_se"] > 0
    # The eval job's samples are the ones scored, and the score is the metric's own.
    samples = sample_job.load_samples(workdir / "eval" / "samples" / "3", 32)
    expected = quality.score(samples)
    assert record["quality_num_samples"] == 32
    assert record["digits_fd"] == pytest.approx(expected["digits_fd"], rel=1e-9)
    assert record["digits_fd_floor"] == expected["digits_fd_floor"] > 0


def test_evaluator_instances_run_with_their_own_sampler(workdir):
    """One job, the same evaluator type twice: 'quality' on the configured chain and the
    instance 'quality_ddim' on 5-step DDIM, each on its own samples, reported apart."""
    config = tiny_config()
    config.evals.quality_ddim = dict(
        type="quality", num_samples=32, sampling=dict(method="ddim", num_steps=5)
    )
    config.eval.evaluators = ("quality", "quality_ddim")
    evaluators.check_config(config)
    record = job.evaluate_checkpoint(config, workdir, 3)
    shared = sample_job.load_samples(workdir / "eval" / "samples" / "3", 32)
    own = sample_job.load_samples(workdir / "eval" / "samples" / "quality_ddim" / "3", 32)
    assert record["sample_method"] == "ancestral" and record["sample_nfe"] == 20
    assert record["quality_ddim/sample_method"] == "ddim"
    assert record["quality_ddim/sample_nfe"] == 5
    assert record["digits_fd"] == pytest.approx(quality.score(shared)["digits_fd"], rel=1e-9)
    expected = quality.score(own)["digits_fd"]
    assert record["quality_ddim/digits_fd"] == pytest.approx(expected, rel=1e-9)
    assert not np.array_equal(shared, own)
    config.eval.evaluators = ("quality", "nonesuch")
    with pytest.raises(errors.ConfigError, match="'nonesuch' is not an entry of config.evals"):
        evaluators.check_config(config)


def test_evaluators_sharing_samples_read_as_many_as_each_asks(workdir):
    """'fid' and 'quality' with the same sampler share one folder of shards though they ask
    for different numbers: the larger adds shards, the smaller reads the first ones."""
    config = tiny_config()
    config.evals.quality.num_samples = 16
    config.evals.fid.num_samples = 48
    config.eval.evaluators = ("quality", "fid")
    features = {"fid": {"feature_fn": fake_feature_fn}}
    record = job.evaluate_checkpoint(config, workdir, 3, evaluator_options=features)
    directory = workdir / "eval" / "samples" / "3"
    assert sorted(p.name for p in directory.glob("shard_*.npz")) == [
        f"shard_{i:05d}.npz" for i in range(3)
    ]
    assert record["quality_num_samples"] == 16 and record["fid_num_samples"] == 48
    first = sample_job.load_samples(directory, 16)
    assert record["digits_fd"] == pytest.approx(quality.score(first)["digits_fd"], rel=1e-9)


def truncate_checkpoint(workdir, step):
    """Cuts the array data files of checkpoint `step` to 1000 bytes (conftest.DAMAGE)."""
    DAMAGE["data truncated"](workdir / "checkpoints" / str(step), None)


class StopPolling(Exception):
    pass


def test_eval_job_records_an_unreadable_checkpoint_as_skipped_and_never_retries_it(
    workdir, capfd, monkeypatch
):
    """Checkpoint 2 truncated: one line names it, metrics.jsonl records it as skipped, the
    others are evaluated; neither the polling job nor a restarted one tries it again."""
    config = tiny_config()
    config.eval.evaluators = ("samples",)
    config.eval.once = False
    config.training.num_train_steps = 5  # not reached: the job goes on polling
    truncate_checkpoint(workdir, 2)
    attempts = []
    restore_step = checkpoint.restore_step

    def counting_restore(workdir, step, abstract):
        attempts.append(step)
        return restore_step(workdir, step, abstract)

    polls = []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == 3:
            raise StopPolling

    monkeypatch.setattr(checkpoint, "restore_step", counting_restore)
    monkeypatch.setattr(job.time, "sleep", sleep)
    with pytest.raises(StopPolling):
        job.evaluate_checkpoints(config, workdir)
    assert attempts == [1, 2, 3]  # three polls, each checkpoint tried once
    lines = read_lines(workdir)
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert "skipped" not in lines[0] and "skipped" not in lines[2]
    assert lines[1]["skipped"].startswith("unreadable checkpoint: default/")
    assert "truncated" in lines[1]["skipped"]
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Event loop is closed" not in out + err
    (line,) = [line for line in out.splitlines() if "unreadable" in line]
    assert line.startswith("Checkpoint 2 of ") and "recorded as skipped" in line

    config.training.num_train_steps = 3  # a restarted job: nothing left to do
    assert job.evaluate_checkpoints(config, workdir) == []
    assert attempts == [1, 2, 3] and "Evaluating" not in capfd.readouterr().out


def test_eval_once_falls_back_to_the_newest_readable_checkpoint(workdir, capfd):
    config = tiny_config()
    config.eval.evaluators = ("samples",)
    config.eval.once = True
    truncate_checkpoint(workdir, 3)
    records = job.evaluate_checkpoints(config, workdir)
    assert [r["step"] for r in records] == [3, 2]
    assert "skipped" in records[0] and "skipped" not in records[1]
    assert (workdir / "eval" / "samples_00000002.png").exists()
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_eval_job_with_no_readable_checkpoint_is_one_error(workdir, capfd, monkeypatch):
    config = tiny_config()
    config.eval.evaluators = ("samples",)
    config.eval.once = False
    for step in (1, 2, 3):
        truncate_checkpoint(workdir, step)
    monkeypatch.setattr(job.time, "sleep", lambda seconds: pytest.fail("polled again"))
    with pytest.raises(checkpoint.CheckpointError) as info:
        job.evaluate_checkpoints(config, workdir)
    message = str(info.value)
    assert "\n" not in message and message.startswith("no readable checkpoint in ")
    assert all(f"step {s}: default/" in message for s in (1, 2, 3))
    assert [r["step"] for r in read_lines(workdir) if "skipped" in r] == [1, 2, 3]
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Event loop is closed" not in out + err


def test_sample_mode_uses_the_newest_readable_checkpoint(workdir, capfd):
    config = tiny_config()
    config.sampling.num_samples = 16
    truncate_checkpoint(workdir, 3)
    assert sample_job.sample(config, workdir) == workdir / "samples" / "2"
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    (line,) = [line for line in out.splitlines() if "unreadable" in line]
    assert line.startswith("Checkpoint 3 in ") and "using step 2" in line
    config.sampling.checkpoint_step = 3  # asked for by its step: an error, in one line
    with pytest.raises(checkpoint.UnreadableCheckpointError, match="checkpoint 3 in .* truncated"):
        sample_job.sample(config, workdir)


@pytest.mark.parametrize("name", ["bpd", "ode_bpd"])
def test_eval_precision_reaches_every_network_call_of_the_likelihoods(name):
    """`precision` marks every convolution and matrix product of the lowered program."""
    from diffusion_jax.evaluation import ode_bpd

    make = {"bpd": bpd.make_bpd_fn, "ode_bpd": ode_bpd.make_ode_bpd_fn}[name]
    mesh = distributed.make_mesh()
    texts = {}
    for precision in ("highest", "default"):
        config = tiny_config()
        settings = {"precision": precision}
        if name == "ode_bpd":
            ode = config.evals.ode_bpd.to_dict()
            settings.update({k: ode[k] for k in ("solver", "divergence", "probe", "num_probes")})
            settings["num_steps"] = 2
        graphdef, rest, abstract = state_lib.abstract_train_state(config, mesh)
        fn = make(config, generation.model_apply(graphdef, rest), mesh, **settings)
        args = (
            abstract.ema_params,
            jax.ShapeDtypeStruct((8, 8, 8, 1), np.uint8),
            jax.ShapeDtypeStruct((8,), np.int32),
            jax.ShapeDtypeStruct((8,), np.float32),
            jax.random.PRNGKey(0),
        )
        texts[precision] = fn.lower(*args).as_text()
    lines = texts["highest"].splitlines()
    ops = [op for op in lines if "convolution" in op or "dot_general" in op]
    assert ops and all("HIGHEST" in line for line in ops), ops[:3]
    assert "HIGHEST" not in texts["default"]
