"""The DDPM U-Net (diffusion_jax.models.unet): sizes, shapes, dropout, bf16, sharding, errors.

Parameter counts and large shapes use abstract models (nnx.eval_shape / jax.eval_shape);
forwards use a tiny network whose parameters are drawn with numpy (fast, no eager init).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs.base import get_base_config
from diffusion_jax.models import build_model, model_out_channels
from diffusion_jax.models.unet import AttnBlock, ResnetBlock, _Layers, timestep_embedding


def tiny_config(**model):
    """A small float32 U-Net (the base config's default is bfloat16; `dtype=` overrides)."""
    c = get_base_config()
    c.model.update(
        dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), num_groups=4)
    )
    c.model.dtype = "float32"
    c.model.update(model)
    return c


def abstract(config):
    return nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))


def n_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def random_state(model, seed=0):
    """Split an (abstract) model; fill its parameters with well-scaled numpy randoms."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        shape = tuple(x.shape)
        if path[-1] == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            v = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif path[-1] == "scale":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            v = 0.1 * rng.standard_normal(shape)
        return jnp.asarray(v, jnp.float32)

    pure = jax.tree_util.tree_map_with_path(lambda p, x: draw(p[-1].key, x), state.to_pure_dict())
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


def inputs(batch, size, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, (batch,)), jnp.int32)
    return x, t


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, state, jitted forward) of the tiny float32 model with dropout 0.5."""
    graphdef, state = random_state(abstract(tiny_config(dropout=0.5)))
    fwd = jax.jit(lambda s, x, t, k: nnx.merge(graphdef, s)(x, t, dropout_key=k))
    fwd_eval = jax.jit(lambda s, x, t: nnx.merge(graphdef, s)(x, t))
    return graphdef, state, fwd, fwd_eval


@pytest.fixture(scope="module")
def abstract_256():
    c = get_base_config()
    c.data.image_size = 256
    c.model.ch_mult = (1, 1, 2, 2, 4, 4)
    return abstract(c)


def test_param_count_cifar10():
    assert n_params(abstract(get_base_config())) == 35_746_307


def test_param_count_256(abstract_256):
    assert n_params(abstract_256) == 113_673_219


def abstract_forward(model, batch, size, channels=3):
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return jax.eval_shape(lambda s, x, t: nnx.merge(graphdef, s)(x, t), state, x, t)


def test_output_shape_256(abstract_256):
    out = abstract_forward(abstract_256, 2, 256)
    assert out.shape == (2, 256, 256, 3) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "var_type,out_c", [("fixed_large", 3), ("learned_range", 6), ("learned", 6)]
)
def test_output_shape_64_and_learned_variance(var_type, out_c):
    c = tiny_config(ch_mult=(1, 2, 2, 2))
    c.data.image_size = 64
    c.diffusion.model_var_type = var_type
    assert model_out_channels(c) == out_c
    out = abstract_forward(abstract(c), 2, 64)
    assert out.shape == (2, 64, 64, out_c) and out.dtype == jnp.float32


def test_forward_tiny(tiny):
    _, state, _, fwd_eval = tiny
    x, t = inputs(2, 32)
    out = fwd_eval(state, x, t)
    assert out.shape == (2, 32, 32, 3)
    assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 1e-3


def test_dropout_only_with_key_and_reproducible(tiny):
    _, state, fwd, fwd_eval = tiny
    x, t = inputs(2, 32)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, b, c = fwd(state, x, t, k1), fwd(state, x, t, k1), fwd(state, x, t, k2)
    det1, det2 = fwd_eval(state, x, t), fwd_eval(state, x, t)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(det1, det2)
    assert float(jnp.abs(a - c).max()) > 1e-3
    assert float(jnp.abs(a - det1).max()) > 1e-3


def test_bfloat16_close_to_float32(tiny):
    _, state, _, fwd_eval = tiny
    graphdef16, _ = nnx.split(abstract(tiny_config(dropout=0.5, dtype="bfloat16")))
    out16 = jax.jit(lambda s, x, t: nnx.merge(graphdef16, s)(x, t))(state, *inputs(2, 32))
    out32 = fwd_eval(state, *inputs(2, 32))
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 1e-2, rel


def test_sharded_forward_equals_single_device(tiny, devices):
    graphdef, state, _, fwd_eval = tiny
    x, t = inputs(8, 32, seed=3)
    ref = fwd_eval(state, x, t)
    mesh = Mesh(np.array(devices), ("data",))
    data = NamedSharding(mesh, PartitionSpec("data"))
    repl = NamedSharding(mesh, PartitionSpec())
    xs, ts = jax.device_put(x, data), jax.device_put(t, data)
    ss = jax.device_put(state, repl)
    fwd = jax.jit(
        lambda s, x, t: nnx.merge(graphdef, s)(x, t),
        in_shardings=(repl, data, data),
        out_shardings=data,
    )
    out = fwd(ss, xs, ts)
    assert out.sharding.is_equivalent_to(data, 4)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_timestep_embedding_matches_formula():
    t = jnp.array([0, 1, 999], jnp.int32)
    emb = np.asarray(timestep_embedding(t, 8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    args = np.array([0, 1, 999])[:, None] * freqs[None]
    np.testing.assert_allclose(emb, np.concatenate([np.sin(args), np.cos(args)], 1), atol=1e-4)


def test_official_initialisation_scales():
    layers = _Layers(num_groups=4, eps=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0))
    block = ResnetBlock(16, 32, 32, 0.0, layers)
    attn = AttnBlock(32, layers)
    k1 = np.asarray(block.conv1.kernel.get_value())
    limit = np.sqrt(3.0 / ((9 * 16 + 9 * 32) / 2))  # uniform fan_avg, scale 1
    assert k1.max() <= limit and k1.max() > 0.9 * limit
    for zero in (block.conv2.kernel, attn.proj_out.kernel):
        assert 0 < np.abs(np.asarray(zero.get_value())).max() < 1e-4
    assert np.all(np.asarray(block.conv1.bias.get_value()) == 0)


def test_downsample_is_tf_same_padding():
    layers = _Layers(num_groups=1, eps=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0))
    from diffusion_jax.models.unet import Downsample

    down = Downsample(1, True, layers)
    w = np.zeros((3, 3, 1, 1), np.float32)
    w[0, 0, 0, 0] = 1.0  # picks the top-left tap: with (0, 1) padding that is x[2i, 2j]
    down.conv.kernel.set_value(jnp.asarray(w))
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(np.asarray(down(x))[0, ..., 0], np.asarray(x)[0, ::2, ::2, 0])


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(image_size=30), r"data\.image_size=30.*2\*\*\(len\(model\.ch_mult\)-1\)=8"),
        (dict(attn_resolutions=(16, 7)), r"model\.attn_resolutions=\(16, 7\).*\[7\]"),
        (dict(ch=48), r"\[48\] \(model\.ch=48 .*model\.num_groups=32"),
        (dict(dtype="float16"), r"model\.dtype='float16'"),
        (dict(name="resnet"), r"config\.model\.name='resnet'.*'unet', 'mlp'"),
    ],
)
def test_bad_config_raises_before_compilation(change, match):
    c = get_base_config()
    for k, v in change.items():
        (c.data if k == "image_size" else c.model)[k] = v
    with pytest.raises(ValueError, match=match):
        build_model(c, nnx.Rngs(0))  # validation runs before any parameter is created


def test_bad_input_shape_raises():
    graphdef, state = nnx.split(abstract(tiny_config()))
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    with pytest.raises(ValueError, match="x must have shape"):
        jax.eval_shape(lambda s, x, t: nnx.merge(graphdef, s)(x, t), state, x, t)
    y = jax.ShapeDtypeStruct((2,), jnp.int32)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    with pytest.raises(ValueError, match="num_classes=0"):
        jax.eval_shape(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y), state, x, t, y)


def test_class_conditional_shapes_and_params():
    c = tiny_config(num_classes=10)
    model = abstract(c)
    assert model.class_embed.embedding.shape == (11, 32)
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    for y in (None, jax.ShapeDtypeStruct((2,), jnp.int32)):
        out = jax.eval_shape(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y), state, x, t, y)
        assert out.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_attention_equals_a_float64_derivation(dtype, tol):
    """AttnBlock (official `attn_block`): x + proj_out(softmax(q k^T / sqrt(C)) v) over the
    H*W positions, q, k, v 1x1 projections of GroupNorm(x); against float64 numpy from the
    block's own parameters (random, so that every term matters)."""
    layers = _Layers(num_groups=4, eps=1e-6, dtype=dtype, rngs=nnx.Rngs(0))
    block = AttnBlock(16, layers)
    rng = np.random.default_rng(0)
    for _, p in nnx.iter_graph(block):
        if isinstance(p, nnx.Param):
            p.set_value(jnp.asarray(rng.normal(0, 0.3, p.shape), jnp.float32))
    x = rng.normal(0.5, 2.0, (2, 4, 4, 16))
    out = np.asarray(jax.jit(lambda v: block(v))(jnp.asarray(x, jnp.float32)), np.float64)

    param = lambda layer, name: np.asarray(getattr(layer, name).get_value(), np.float64)
    g = x.reshape(2, 16, 4, 4)  # [B, positions, groups, channels per group]
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    h = ((g - mean) / np.sqrt(var + 1e-6)).reshape(2, 16, 16)
    h = h * param(block.norm, "scale") + param(block.norm, "bias")
    q, k, v = (h @ param(f, "kernel") + param(f, "bias") for f in (block.q, block.k, block.v))
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(16)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    a = (w / w.sum(-1, keepdims=True)) @ v
    ref = x + (a @ param(block.proj_out, "kernel") + param(block.proj_out, "bias")).reshape(x.shape)
    assert np.abs(out - ref).max() / np.abs(ref).max() < tol

    # The logits q k^T (contracting the channels of both) are stored in the compute dtype and
    # the softmax runs in float32 (as improved-diffusion's fp16 attention does).
    jaxpr = jax.make_jaxpr(lambda v: block(v))(jnp.asarray(x, jnp.float32)).jaxpr
    products = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    logits = [e for e in products if e.params["dimension_numbers"][0] == ((2,), (2,))]
    assert len(logits) == 1 and logits[0].outvars[0].aval.dtype == dtype
    exps = [e for e in jaxpr.eqns if e.primitive.name == "exp"]
    assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)
