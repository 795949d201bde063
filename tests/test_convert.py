"""Weight import (diffusion_jax.tools.convert) on synthetic checkpoints with the real key names.

* diffusers: a tiny google/ddpm-cifar10-32-style folder (config.json + safetensors) whose
  state-dict names and torch shapes are generated here from UNet2DModel's block logic; the
  imported model is checked against an independent numpy forward of the diffusers network.
* TF: a tf.compat.v1 Saver checkpoint with the official variable names
  (`model/down_0/block_0/conv1/W`, ..., EMA shadows, Adam slots, global_step), built from
  the same weights; it must import to the same parameters (EMA chosen), and the TF-SAME
  downsampling / nearest upsampling convs must match TensorFlow's own ops.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from configs.base import get_base_config
from diffusion_jax.models import build_model
from diffusion_jax.tools.convert import cli, from_diffusers, from_tf, imported, mapping

# google/ddpm-cifar10-32's config.json, shrunk (2 levels, 1 block, 8/16 channels, 4 groups).
DIFFUSERS_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.1.1",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [8, 16],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 4,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
ATTN_NEW = ("group_norm", "to_q", "to_k", "to_v", "to_out.0")
ATTN_LEGACY = ("group_norm", "query", "key", "value", "proj_attn")


# --------------------------------------------------------------------------------------
# diffusers names/shapes, following UNet2DModel's constructor.


def diffusers_shapes(cfg, legacy=False):
    boc, nb = cfg["block_out_channels"], cfg["layers_per_block"]
    n, cin, temb = len(boc), cfg["in_channels"], 4 * boc[0]
    s = {}

    def lin(name, i, o):
        s[f"{name}.weight"], s[f"{name}.bias"] = (o, i), (o,)

    def conv(name, i, o, k=3):
        s[f"{name}.weight"], s[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def resnet(name, i, o):
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", i, o)
        lin(f"{name}.time_emb_proj", temb, o)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o)
        if i != o:
            conv(f"{name}.conv_shortcut", i, o, k=1)

    def attn(name, c):
        names = ATTN_LEGACY if legacy else ATTN_NEW
        norm(f"{name}.{names[0]}", c)
        for sub in names[1:]:
            lin(f"{name}.{sub}", c, c)

    conv("conv_in", cin, boc[0])
    lin("time_embedding.linear_1", boc[0], temb)
    lin("time_embedding.linear_2", temb, temb)
    out = boc[0]
    for i, typ in enumerate(cfg["down_block_types"]):
        inp, out = out, boc[i]
        for j in range(nb):
            resnet(f"down_blocks.{i}.resnets.{j}", inp if j == 0 else out, out)
            if typ.startswith("Attn"):
                attn(f"down_blocks.{i}.attentions.{j}", out)
        if i < n - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", out, out)
    resnet("mid_block.resnets.0", boc[-1], boc[-1])
    attn("mid_block.attentions.0", boc[-1])
    resnet("mid_block.resnets.1", boc[-1], boc[-1])
    rev = boc[::-1]
    out = rev[0]
    for k, typ in enumerate(cfg["up_block_types"]):
        prev, out, inp = out, rev[k], rev[min(k + 1, n - 1)]
        for j in range(nb + 1):
            skip = inp if j == nb else out
            resnet(f"up_blocks.{k}.resnets.{j}", (prev if j == 0 else out) + skip, out)
            if typ.startswith("Attn"):
                attn(f"up_blocks.{k}.attentions.{j}", out)
        if k < n - 1:
            conv(f"up_blocks.{k}.upsamplers.0.conv", out, out)
    norm("conv_norm_out", boc[0])
    conv("conv_out", boc[0], cfg["out_channels"])
    return s


def random_state_dict(shapes, seed=0):
    rng = np.random.default_rng(seed)
    sd = {}
    for k, shp in shapes.items():
        if len(shp) > 1:
            v = rng.standard_normal(shp) / np.sqrt(np.prod(shp[1:]))
        elif "norm" in k.rsplit(".", 2)[-2] and k.endswith("weight"):
            v = 1.0 + 0.1 * rng.standard_normal(shp)
        else:
            v = 0.1 * rng.standard_normal(shp)
        sd[k] = v.astype(np.float32)
    return sd


def write_diffusers(folder, cfg, sd):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(sd, os.path.join(folder, "diffusion_pytorch_model.safetensors"))


# --------------------------------------------------------------------------------------
# Independent numpy forward of the diffusers DDPM network (NCHW, torch layouts, float64).


def np_conv(x, w, b, stride=1, pad=1):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))
    win = win[:, :, ::stride, ::stride]
    return np.einsum("bchwij,ocij->bohw", win, w) + b[None, :, None, None]


def np_gn(x, w, b, groups, eps):
    bsz, c, h, wd = x.shape
    g = x.reshape(bsz, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    return g.reshape(x.shape) * w[None, :, None, None] + b[None, :, None, None]


def silu(x):
    return x / (1.0 + np.exp(-x))


def np_diffusers_forward(sd, cfg, x, t, legacy=False):
    p = {k: v.astype(np.float64) for k, v in sd.items()}
    G, eps = cfg["norm_num_groups"], cfg["norm_eps"]
    boc, nb, n = cfg["block_out_channels"], cfg["layers_per_block"], len(cfg["block_out_channels"])
    gn = lambda h, name: np_gn(h, p[f"{name}.weight"], p[f"{name}.bias"], G, eps)
    lin = lambda h, name: h @ p[f"{name}.weight"].T + p[f"{name}.bias"]
    conv = lambda h, name, **kw: np_conv(h, p[f"{name}.weight"], p[f"{name}.bias"], **kw)
    q_, k_, v_, o_ = (ATTN_LEGACY if legacy else ATTN_NEW)[1:]

    def resnet(h, name, temb):
        r = conv(silu(gn(h, f"{name}.norm1")), f"{name}.conv1")
        r = r + lin(silu(temb), f"{name}.time_emb_proj")[:, :, None, None]
        r = conv(silu(gn(r, f"{name}.norm2")), f"{name}.conv2")
        if f"{name}.conv_shortcut.weight" in p:
            h = conv(h, f"{name}.conv_shortcut", pad=0)
        return h + r

    def attn(h, name):
        bsz, c, hh, ww = h.shape
        tok = gn(h, f"{name}.group_norm").reshape(bsz, c, -1).transpose(0, 2, 1)
        q, k, v = (lin(tok, f"{name}.{s}") for s in (q_, k_, v_))
        w = q @ k.transpose(0, 2, 1) / np.sqrt(c)
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = lin(w @ v, f"{name}.{o_}")
        return h + o.transpose(0, 2, 1).reshape(h.shape)

    half = boc[0] // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    e = t[:, None].astype(np.float64) * freqs[None]
    temb = np.concatenate([np.sin(e), np.cos(e)], 1)
    temb = lin(silu(lin(temb, "time_embedding.linear_1")), "time_embedding.linear_2")
    h = conv(x, "conv_in")
    hs = [h]
    for i, typ in enumerate(cfg["down_block_types"]):
        for j in range(nb):
            h = resnet(h, f"down_blocks.{i}.resnets.{j}", temb)
            if typ.startswith("Attn"):
                h = attn(h, f"down_blocks.{i}.attentions.{j}")
            hs.append(h)
        if i < n - 1:
            h = np.pad(h, ((0, 0), (0, 0), (0, 1), (0, 1)))
            h = conv(h, f"down_blocks.{i}.downsamplers.0.conv", stride=2, pad=0)
            hs.append(h)
    h = resnet(h, "mid_block.resnets.0", temb)
    h = attn(h, "mid_block.attentions.0")
    h = resnet(h, "mid_block.resnets.1", temb)
    for k, typ in enumerate(cfg["up_block_types"]):
        for j in range(nb + 1):
            h = resnet(np.concatenate([h, hs.pop()], 1), f"up_blocks.{k}.resnets.{j}", temb)
            if typ.startswith("Attn"):
                h = attn(h, f"up_blocks.{k}.attentions.{j}")
        if k < n - 1:
            h = conv(h.repeat(2, 2).repeat(2, 3), f"up_blocks.{k}.upsamplers.0.conv")
    return conv(silu(gn(h, "conv_norm_out")), "conv_out")


def inputs(cfg, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    s = cfg["sample_size"]
    x = rng.standard_normal((batch, cfg["in_channels"], s, s)).astype(np.float32)
    return x, rng.integers(0, 1000, (batch,)).astype(np.int32)


@jax.jit(static_argnums=0)
def _forward(graphdef, state, x, t):
    return nnx.merge(graphdef, state)(x, t)


def jax_forward(model_config, params, x_nchw, t):
    graphdef, state = nnx.split(imported.build_imported_model(model_config, params))
    out = _forward(graphdef, state, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t))
    return np.asarray(out).transpose(0, 3, 1, 2)


# --------------------------------------------------------------------------------------
# diffusers tests.


@pytest.fixture(scope="module")
def diffusers_sd():
    return random_state_dict(diffusers_shapes(DIFFUSERS_CONFIG))


@pytest.mark.parametrize("legacy", [False, True])
def test_diffusers_import_matches_numpy_reference(tmp_path, diffusers_sd, legacy):
    sd = diffusers_sd
    if legacy:  # the original upload's attention names
        ren = dict(zip(ATTN_NEW, ATTN_LEGACY, strict=True))
        sd = {}
        for k, v in diffusers_sd.items():
            for new, old in ren.items():
                if ".attentions." in k:
                    k = k.replace(f".{new}.", f".{old}.")
            sd[k] = v
        assert set(sd) == set(diffusers_shapes(DIFFUSERS_CONFIG, legacy=True))
    write_diffusers(tmp_path, DIFFUSERS_CONFIG, sd)
    cfg, params = from_diffusers.convert_diffusers(tmp_path)
    assert cfg.model.ch == 8 and cfg.model.ch_mult == (1, 2)
    assert cfg.model.num_res_blocks == 1 and cfg.model.attn_resolutions == (16,)
    assert cfg.data.image_size == 32 and cfg.data.channels == 3 and "diffusion" not in cfg
    assert cfg.model.num_groups == 4 and cfg.model.norm_eps == 1e-6
    flat = mapping.flatten_params(params)  # every parameter filled, every tensor consumed
    assert sum(v.size for v in flat.values()) == sum(v.size for v in sd.values())
    assert len(flat) == len(sd)
    x, t = inputs(DIFFUSERS_CONFIG)
    ref = np_diffusers_forward(sd, DIFFUSERS_CONFIG, x.astype(np.float64), t, legacy=legacy)
    out = jax_forward(cfg, params, x, t)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.1
    # layout spot check: conv OIHW -> HWIO, Linear [out, in] -> [in, out]
    np.testing.assert_array_equal(
        params["conv_in"]["kernel"], diffusers_sd["conv_in.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        params["down"][1]["blocks"][0]["nin_shortcut"]["kernel"],
        diffusers_sd["down_blocks.1.resnets.0.conv_shortcut.weight"][:, :, 0, 0].T,
    )


def test_diffusers_reports_missing_extra_and_mismatched(diffusers_sd):
    cfg = from_diffusers.diffusers_model_config(DIFFUSERS_CONFIG)
    sd = dict(diffusers_sd)
    del sd["mid_block.attentions.0.to_q.bias"]
    sd["mid_block.attentions.0.bogus.weight"] = np.zeros((2,), np.float32)
    sd["conv_out.weight"] = np.zeros((3, 8, 1, 1), np.float32)
    with pytest.raises(ValueError) as e:
        from_diffusers.convert_diffusers_state(sd, cfg)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "mid_block.attentions.0.to_q.bias" in msg
    assert "extra keys (1)" in msg and "mid_block.attentions.0.bogus.weight" in msg
    assert "mismatched shapes (1)" in msg
    assert "conv_out.weight: checkpoint (3, 8, 1, 1) vs model (3, 8, 3, 3)" in msg


@pytest.mark.parametrize(
    "field,value", [("flip_sin_to_cos", True), ("downsample_padding", 1), ("freq_shift", 0)]
)
def test_diffusers_rejects_other_architectures(field, value):
    with pytest.raises(ValueError, match=field):
        from_diffusers.diffusers_model_config({**DIFFUSERS_CONFIG, field: value})


def test_diffusers_learned_variance_config():
    cfg = from_diffusers.diffusers_model_config({**DIFFUSERS_CONFIG, "out_channels": 6})
    assert cfg.diffusion.model_var_type == "learned_range"
    merged = mapping.merge_imported_config(get_base_config(), cfg)
    assert merged.diffusion.model_var_type == "learned_range" and merged.model.ch == 8
    base = get_base_config()
    base.diffusion.model_var_type = "learned"
    with pytest.raises(ValueError, match="fixed variance"):
        mapping.merge_imported_config(base, from_diffusers.diffusers_model_config(DIFFUSERS_CONFIG))


def test_save_load_roundtrip_cli_and_merge(tmp_path, diffusers_sd):
    src, out = tmp_path / "src", tmp_path / "out"
    write_diffusers(src, DIFFUSERS_CONFIG, diffusers_sd)
    cli.main(["--source", str(src), "--out", str(out)])
    cfg, params = imported.load_imported(out)
    cfg0, params0 = from_diffusers.convert_diffusers(src)
    assert cfg.to_dict() == cfg0.to_dict()
    a, b = mapping.flatten_params(params), mapping.flatten_params(params0)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # the merged experiment config builds a model that accepts the parameters
    merged = mapping.merge_imported_config(get_base_config(), cfg)
    model = nnx.eval_shape(lambda: build_model(merged, nnx.Rngs(0)))
    imported.load_params_into(model, params)
    np.testing.assert_array_equal(
        np.asarray(model.conv_out.kernel.get_value()), params["conv_out"]["kernel"]
    )
    bad = dict(params)
    bad.pop("conv_in")
    with pytest.raises(ValueError, match="conv_in/kernel"):
        imported.load_params_into(model, bad)


# --------------------------------------------------------------------------------------
# Official TensorFlow checkpoints.


def diffusers_to_official(sd, n_levels, scope="model"):
    """Rename/re-layout a diffusers state dict to the official TF variables."""
    out = {}
    res = {"time_emb_proj": "temb_proj", "conv_shortcut": "nin_shortcut"}
    att = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k, v in sd.items():
        mod, leaf = k.rsplit(".", 1)
        p = mod.split(".")
        if p[0] == "time_embedding":
            name = "temb/dense0" if p[1] == "linear_1" else "temb/dense1"
        elif p[0] in ("conv_in", "conv_out"):
            name = p[0]
        elif p[0] == "conv_norm_out":
            name = "norm_out"
        elif p[0] == "mid_block":
            name = {
                ("resnets", "0"): "mid/block_1",
                ("attentions", "0"): "mid/attn_1",
                ("resnets", "1"): "mid/block_2",
            }[(p[1], p[2])]
            sub = ".".join(p[3:])
            name += "/" + (res.get(sub, sub) if p[1] == "resnets" else att[sub])
        else:
            down = p[0] == "down_blocks"
            lvl = int(p[1]) if down else n_levels - 1 - int(p[1])
            base = f"{'down' if down else 'up'}_{lvl}"
            if p[2] in ("downsamplers", "upsamplers"):
                name = f"{base}/{'downsample' if down else 'upsample'}/conv"
            else:
                sub = ".".join(p[4:])
                kind = "block" if p[2] == "resnets" else "attn"
                name = f"{base}/{kind}_{p[3]}/" + (
                    res.get(sub, sub) if kind == "block" else att[sub]
                )
        is_norm = name.rsplit("/", 1)[-1].startswith("norm")
        if leaf == "weight" and is_norm:
            tf_leaf, val = "gamma", v
        elif leaf == "bias":
            tf_leaf, val = ("beta" if is_norm else "b"), v
        elif v.ndim == 4 and v.shape[2:] == (1, 1):
            tf_leaf, val = "W", v[:, :, 0, 0].T
        elif v.ndim == 4:
            tf_leaf, val = "W", v.transpose(2, 3, 1, 0)
        else:
            tf_leaf, val = "W", v.T
        out[f"{scope}/{name}/{tf_leaf}"] = np.ascontiguousarray(val)
    return out


def write_tf_checkpoint(path, variables):
    import tensorflow as tf

    with tf.Graph().as_default():
        tf_vars = {k: tf.compat.v1.Variable(v, name=k) for k, v in variables.items()}
        saver = tf.compat.v1.train.Saver(var_list=tf_vars)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return saver.save(sess, str(path))


@pytest.fixture(scope="module")
def tf_checkpoint(tmp_path_factory, diffusers_sd):
    """An official-style training checkpoint: raw vars (EMA + 1), EMA shadows, Adam, step."""
    ema = diffusers_to_official(diffusers_sd, 2)
    variables = {}
    for k, v in ema.items():
        variables[k] = v + 1.0
        variables[k + "/ExponentialMovingAverage"] = v
        variables[k + "/Adam"] = np.zeros_like(v)
        variables[k + "/Adam_1"] = np.zeros_like(v)
    variables["global_step"] = np.array(790000, np.int64)
    variables["beta1_power"] = np.array(0.5, np.float32)
    prefix = write_tf_checkpoint(tmp_path_factory.mktemp("tf") / "model.ckpt-790000", variables)
    return prefix, ema


def test_tf_import_uses_ema_and_matches_diffusers(tf_checkpoint, diffusers_sd):
    prefix, ema = tf_checkpoint
    assert "model/down_0/block_0/conv1/W" in ema and "model/temb/dense0/W" in ema
    assert "model/down_1/attn_0/q/W" in ema and "model/up_1/upsample/conv/W" in ema
    cfg, params = from_tf.convert_tf(prefix, num_groups=4)  # image size: attention at 16
    cfg_d = from_diffusers.diffusers_model_config(DIFFUSERS_CONFIG)
    params_d = from_diffusers.convert_diffusers_state(diffusers_sd, cfg_d)
    assert cfg.to_dict() == cfg_d.to_dict()
    a, b = mapping.flatten_params(params), mapping.flatten_params(params_d)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=0, err_msg=k)
    _, raw = from_tf.convert_tf(prefix, use_ema=False, num_groups=4)
    np.testing.assert_allclose(raw["conv_in"]["kernel"], params["conv_in"]["kernel"] + 1.0)


def test_tf_resampling_matches_tensorflow_ops(tf_checkpoint):
    import tensorflow as tf

    prefix, ema = tf_checkpoint
    cfg, params = from_tf.convert_tf(prefix, num_groups=4)
    model = imported.build_imported_model(cfg, params)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 8)).astype(np.float32)
    w, b = ema["model/down_0/downsample/conv/W"], ema["model/down_0/downsample/conv/b"]
    want = tf.nn.conv2d(x, w, strides=2, padding="SAME").numpy() + b
    np.testing.assert_allclose(np.asarray(model.down[0].resample(jnp.asarray(x))), want, atol=1e-5)
    x = np.random.default_rng(1).standard_normal((2, 4, 4, 16)).astype(np.float32)
    w, b = ema["model/up_1/upsample/conv/W"], ema["model/up_1/upsample/conv/b"]
    up = tf.image.resize(x, [8, 8], method="nearest")
    want = tf.nn.conv2d(up, w, strides=1, padding="SAME").numpy() + b
    np.testing.assert_allclose(np.asarray(model.up[1].resample(jnp.asarray(x))), want, atol=1e-5)


def test_tf_reports_missing_extra_and_mismatched(tf_checkpoint):
    _, ema = tf_checkpoint
    variables = dict(ema)
    del variables["model/mid/attn_1/q/b"]
    variables["model/mid/attn_1/extra/W"] = np.zeros((2, 2), np.float32)
    variables["model/up_0/block_1/conv2/W"] = np.zeros((3, 3, 8, 9), np.float32)
    with pytest.raises(ValueError) as e:
        from_tf.convert_tf_variables(variables, num_groups=4)
    msg = str(e.value)
    assert "model/mid/attn_1/q/b" in msg and "model/mid/attn_1/extra/W" in msg
    assert "model/up_0/block_1/conv2/W: checkpoint (3, 3, 8, 9) vs model (3, 3, 8, 8)" in msg
