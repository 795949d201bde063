"""Shared base configuration: the DDPM CIFAR-10 recipe (Ho et al. 2020, §4 and
Appendix B, and the official code's CIFAR-10 run).

Every other config file starts from `get_base_config()` and states only what differs.
Every value can be overridden on the command line, e.g. `--config.training.batch_size=64`.
"""

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # JAX's persistent compilation cache for train/eval/sample: "auto" (a user cache folder,
    # $DIFFUSION_JAX_CACHE/jax_compilation_cache), a path (local or gs://), or "" (off).
    config.compilation_cache = "auto"

    config.data = data = ml_collections.ConfigDict()
    # cifar10 | celeb_a_hq | lsun_bedroom | lsun_church | lsun_cat | digits | swissroll
    data.name = "cifar10"
    data.image_size = 32
    data.channels = 3
    data.random_flip = True
    data.data_dir = ""  # tfds data_dir, or the folder holding LSUN TFRecords; "" = tfds default
    data.tfrecord_pattern = ""  # LSUN: glob of TFRecord files, relative to data_dir if not absolute
    data.train_split = "train"
    data.eval_split = "test"
    data.prefetch = 2
    data.shuffle_buffer = 10_000  # streamed datasets (celeb_a_hq, LSUN): tf.data shuffle buffer
    data.levels = 256  # grey levels per channel of the data; stored samples are rounded to them

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "linear"  # linear | cosine | quad | const | jsd | warmup10 | warmup50
    diffusion.num_timesteps = 1000
    diffusion.beta_start = 1e-4
    diffusion.beta_end = 0.02
    diffusion.model_output = "eps"  # eps | x0 | xprev | v
    diffusion.model_var_type = "fixed_large"  # fixed_large | fixed_small | learned | learned_range
    diffusion.loss_type = "mse"  # mse | kl | hybrid
    diffusion.hybrid_lambda = 0.001
    diffusion.timestep_sampler = "uniform"  # uniform | loss_aware
    diffusion.history_per_term = 10

    config.model = model = ml_collections.ConfigDict()
    model.name = "unet"  # unet | mlp
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.num_groups = 32
    model.norm_eps = 1e-6
    model.num_classes = 0  # 0: unconditional; >0: class-conditional with an extra null class
    # compute dtype: bfloat16 | float32. bfloat16 runs the convolutions and dense layers in
    # bfloat16 with float32 parameters, GroupNorm statistics and gradient sums (models/
    # precision.py): the same quality on the digits, 11% more steps/s on a v3-8 (BENCHMARKS.md
    # "Mixed precision"). The CPU configs (digits, swissroll) keep float32: XLA:CPU runs
    # bfloat16 convolutions ~3x slower.
    model.dtype = "bfloat16"
    model.hidden = 128  # mlp only
    model.depth = 3  # mlp only

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128  # global batch, split over all devices of all hosts
    training.num_train_steps = 800_000
    training.learning_rate = 2e-4
    training.warmup_steps = 5000
    training.grad_clip = 1.0
    # ZeRO-1: the float32 parameters, Adam moments and EMA split over the data axis, 1/N per
    # device; each step gathers the parameters whole (on a TPU the kernels in bfloat16)
    training.shard_optimizer = True
    training.ema_decay = 0.9999
    training.label_dropout = 0.0  # probability of replacing the label by the null class (CFG)
    training.steps_per_call = 1
    training.log_every = 100
    training.sample_every = 10_000
    training.checkpoint_every = 10_000
    training.keep = 3  # most recent checkpoints kept
    training.keep_every = 50_000  # and every K-th step kept for evaluation
    # At the end: this many samples (configured sampler, EMA) -> samples/final.png and, where
    # the project has a metric for the data (digits, swiss roll), their quality. 0 = off.
    training.final_samples = 64

    config.sampling = sampling = ml_collections.ConfigDict()
    # The samplers (diffusion_jax/sampling/registry.py): ancestral | ddim (over the chain) |
    # dpm_solver++ | sde_dpm_solver++ | dpm_solver | unipc | heun (over a time grid)
    sampling.method = "ancestral"
    # ancestral/ddim only: "" full chain; "100" K evenly spaced; "10,10,10" sections; "ddim50"
    sampling.respacing = ""
    # Steps (0 = not given). Time-grid samplers need it (NFE = num_steps; heun 2N - 1). For
    # ancestral/ddim with respacing = "", the chain of `spacing` with N steps (ancestral
    # "uniform" = respacing "N"; ddim "uniform" = respacing "ddimN", the stride keeping N).
    sampling.num_steps = 0
    # "" = the method's default (ancestral/ddim: uniform, heun: quadratic, on the cosine
    # schedule logsnr, others: logsnr)
    # | uniform | logsnr | quadratic | karras (ancestral/ddim: uniform | quadratic only)
    # | trailing (ddim only: t = i / num_steps down to 0, the grid of distilled students)
    sampling.spacing = ""
    # 0 = default; dpm_solver: 1 | 2 | 3 (3), dpm_solver++ and sde_: 1 | 2 (2), unipc: 1-3 (2)
    sampling.order = 0
    sampling.dpm_solver_variant = "singlestep"  # dpm_solver: singlestep (-fast) | multistep
    sampling.unipc_variant = "bh2"  # unipc: B(h) = expm1(h) (bh2) | h (bh1)
    sampling.lower_order_final = True  # multistep solvers: lower orders in the last steps
    # Time-grid samplers: True replaces the grid's last point t = 1/T by sigma = 0 (x = x0_hat;
    # diffusers' final_sigmas_type="zero"), same NFE; False stops at t = 1/T; None (unset) is
    # the method's default: True, except singlestep dpm_solver (an order-1 call to 0 there).
    sampling.denoise_to_zero = config_dict.placeholder(bool)
    sampling.eta = 0.0
    sampling.clip_denoised = True
    sampling.guidance_scale = 0.0  # classifier-free guidance weight w (0 = off)
    sampling.num_samples = 50_000
    sampling.batch_size = 256
    # previews' chain (ancestral/ddim; others, and distilled students: num_steps)
    sampling.preview_respacing = "100"
    sampling.preview_num = 64
    sampling.grid_num = 64  # samples in the grid of --mode sample and of samples/final.png
    sampling.checkpoint_step = -1  # --mode sample: the checkpoint to draw from (-1 = latest)
    sampling.max_shards = 0  # --mode sample: stop after this many new shards (0 = all)

    # Progressive distillation (`--mode distill`, training/distill.py; Salimans & Ho 2022):
    # rounds in which a student learns one DDIM step (`sampling.spacing="trailing"`) from two
    # of its teacher's, halving the steps from start_steps / 2 down to end_steps. The student
    # predicts `diffusion.model_output` (v or x0); an eps teacher is first fine-tuned into it
    # on the data for one round. `training` sets the batch, learning rate (decayed linearly to
    # 0 over each round), clipping and EMA; `training.num_train_steps` > 0 stops early. Every
    # round's last checkpoint is written and kept.
    config.distill = distill = ml_collections.ConfigDict()
    distill.teacher_workdir = ""  # the trained teacher's workdir ("" = not a distillation)
    distill.teacher_step = -1  # its checkpoint (-1 = the latest readable one)
    # What the teacher predicts (checked against its config.json): eps | v | x0. An eps teacher
    # gets round 0, the fine-tune into diffusion.model_output; otherwise it must match it.
    distill.teacher_output = "eps"
    distill.start_steps = 1024  # the teacher's DDIM steps in round 1
    distill.end_steps = 4  # the last student's steps
    distill.steps_per_round = 50_000  # updates per round

    # Consistency models (`--mode consistency`, training/consistency_step.py; the math in
    # diffusion/consistency.py): a one/few-step student f(x_t, t), equal to x_t / alpha_t at
    # t = 1/T by construction, that starts from a trained teacher's weights and predicts
    # diffusion.model_output (v or x0). "distillation" (CD, Song et al. 2023): the target is the
    # target network at the teacher's one ODE step from s to r; "tuning" (ECT, Geng et al.
    # 2024): at x_0 + r eps, the data alone. Pairs (s, r) of EDM noise levels: s lognormal,
    # r = s (1 - n(s) / q^stage), n(s) = 1 + k sigmoid(-b s); num_stages stages over
    # training.num_train_steps (stage 0: r = s_min, plain denoising). Sample with
    # sampling.method="consistency".
    config.consistency = cm = ml_collections.ConfigDict()
    cm.method = ""  # "" (not a consistency run) | distillation | tuning
    cm.teacher_workdir = ""  # the trained teacher's workdir (its EMA weights start the student)
    cm.teacher_step = -1  # its checkpoint (-1 = the latest readable one)
    cm.teacher_output = "eps"  # what the teacher predicts (checked against its config.json)
    cm.teacher_solver = "ddim"  # distillation's teacher ODE step: ddim | heun
    cm.target_decay = 0.0  # EMA of the target network (0 = the online network, stop-gradient)
    cm.distance = "pseudo_huber"  # pseudo_huber (iCT) | l2
    cm.weighting = "inverse_delta"  # 1 / (s - r) (iCT) | uniform
    cm.p_mean = -1.1  # lognormal of s (iCT)
    cm.p_std = 2.0
    cm.num_stages = 8
    cm.q = 2.0
    cm.k = 8.0
    cm.b = 1.0

    config.eval = ev = ml_collections.ConfigDict()
    ev.once = False  # --mode eval: the latest checkpoint only, then exit (else poll)
    ev.poll_seconds = 60
    # The entries of config.evals run on each checkpoint, in this order.
    ev.evaluators = ("bpd", "samples", "interpolation", "fid")

    # Evaluator instances (big_vision style): config.evals.<name> = dict(type=..., **settings),
    # the settings being the keyword-only arguments of the type's constructor
    # (diffusion_jax/evaluation/__init__.py); an optional `sampling=dict(...)` overrides
    # config.sampling for that instance, e.g. FID at 20-step DPM-Solver++:
    #   config.evals.fid_dpm20 = dict(
    #       config.evals.fid.to_dict(), sampling=dict(method="dpm_solver++", num_steps=20))
    config.evals = ml_collections.ConfigDict()
    # Likelihoods: test images, global batch, matmul/conv precision of every network call
    # (highest: a float32 network whatever model.dtype, and float32 products on TPU and GPU,
    # no bf16 passes, no TF32).
    likelihood = dict(num_examples=10_000, batch_size=256, precision="highest")
    config.evals.bpd = dict(type="bpd", **likelihood)
    config.evals.ode_bpd = dict(
        type="ode_bpd",
        **likelihood,
        num_steps=50,  # fixed RK4 steps, uniform in log-SNR (4 NFE each)
        solver="rk4",  # rk4 | heun
        divergence="hutchinson",  # hutchinson | exact (small data only)
        probe="rademacher",  # rademacher | gaussian
        num_probes=1,
    )
    config.evals.samples = dict(
        type="samples",
        grid_num=64,  # samples in the grid picture
        progressive_steps=10,  # x0_hat snapshots in the progressive strip (DDPM Fig. 6)
        progressive_rows=8,
    )
    config.evals.interpolation = dict(
        type="interpolation",
        timestep=500,  # where the latents mix (DDPM §4.4, Fig. 8)
        pairs=4,
        lambdas=11,
    )
    config.evals.fid = dict(
        type="fid",
        num_samples=50_000,
        batch_size=256,  # Inception batch of the reference images
        inception_weights="",  # pt_inception-2015-12-05-6726825d.pth ("" = cache/download)
        # a pytorch-fid/TTUR .npz (mu, sigma); "" = computed once from reference_split and
        # cached in $DIFFUSION_JAX_CACHE/fid_stats
        reference_stats="",
        reference_split="train",  # DDPM §5: FID against the training set statistics
        reference_examples=0,  # 0 = the whole split
        is_splits=10,
        is_logits_bias=False,  # IS from pool3 @ W without the fc bias, as improved-gan's code
    )
    config.evals.quality = dict(type="quality", num_samples=50_000)
    return config
