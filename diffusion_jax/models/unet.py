"""The DDPM U-Net (Ho et al. 2020, section 4 and appendix B; official model `unet2d16b2`).

A PixelCNN++-style U-Net in NHWC layout:

* sinusoidal timestep embedding (half sin, half cos) -> Dense(4ch) -> swish -> Dense(4ch),
  optionally plus a learned class embedding (num_classes + 1 rows, the last row being the
  null class used by classifier-free guidance);
* `len(ch_mult)` resolution levels going down, each with `num_res_blocks` residual blocks
  (GroupNorm, swish, 3x3 conv, timestep projection, GroupNorm, swish, dropout, 3x3 conv),
  single-head self-attention after every block whose resolution is in `attn_resolutions`,
  and a stride-2 3x3 conv with TensorFlow "SAME" padding ((0, 1) per spatial axis) between
  levels;
* a middle of residual block, attention, residual block;
* the mirror path up with `num_res_blocks + 1` blocks per level, each consuming one skip
  connection, nearest-neighbour x2 upsampling followed by a 3x3 conv between levels;
* GroupNorm, swish and a 3x3 conv to the output channels.

The parameter names mirror the variable scopes of the official TensorFlow code (`down/0/
blocks/1/conv1/kernel` <-> `model/down_0/block_1/conv1/W`), which keeps checkpoint
conversion (`diffusion_jax.tools.convert`) a table lookup.

Initialisation follows the official code: variance scaling (fan_avg, uniform) with scale 1,
and scale 1e-10 for the last conv of every residual block, the attention output projection
and the final conv; biases are zero.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import precision
from diffusion_jax.runtime import errors

SUPPORTED_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ZERO_INIT_SCALE = 1e-10


def default_init(scale: float = 1.0) -> jax.nn.initializers.Initializer:
    """Official DDPM initializer: variance_scaling(scale, "fan_avg", "uniform")."""
    return jax.nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal timestep embedding of the official DDPM code (Ho et al. 2020, §4).

    Frequencies are exp(-ln(10000) * i / (dim/2 - 1)), i = 0..dim/2-1; the output is
    [sin(t f), cos(t f)] concatenated in that order (diffusers: flip_sin_to_cos=False,
    freq_shift=1), zero padded by one column when `dim` is odd.

    Args:
      t: [B] integer or float timesteps, embedded as given.
      dim: embedding width.

    Returns:
      [B, dim] float32.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {t.shape}")
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The U-Net's hyper-parameters: the one list of them, used by the model, the importers
    (`convert`) and the checkpoint compatibility check. Validated on construction.

    image_size: H = W of the inputs; in_channels / out_channels: C of x and of the output (2x
    for a learned variance); ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
    resamp_with_conv, num_groups, norm_eps: as the official `unet.model` and `config.model`;
    num_classes: 0 for unconditional, otherwise an embedding of num_classes + 1 rows (row
    num_classes = the null class); dtype: compute dtype ("float32" | "bfloat16"), parameters
    are always float32.
    """

    image_size: int
    in_channels: int
    out_channels: int
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_groups: int = 32
    norm_eps: float = 1e-6
    num_classes: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            value = (
                tuple(int(v) for v in value)
                if isinstance(value, Sequence) and not isinstance(value, str)
                else value
            )
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        """ValueError naming the field and values for any inconsistent setting; runs before
        any parameter is created, hence before any compilation."""
        image_size, ch, ch_mult = self.image_size, self.ch, self.ch_mult
        if self.dtype not in SUPPORTED_DTYPES:
            raise errors.ConfigError(
                f"model.dtype={self.dtype!r} is not supported; "
                f"expected one of {sorted(SUPPORTED_DTYPES)}"
            )
        if len(ch_mult) < 1:
            raise errors.ConfigError(f"model.ch_mult={ch_mult} must have at least one level")
        if ch < 1 or any(m < 1 for m in ch_mult):
            raise errors.ConfigError(f"model.ch={ch} and model.ch_mult={ch_mult} must be positive")
        if self.num_res_blocks < 1:
            raise errors.ConfigError(f"model.num_res_blocks={self.num_res_blocks} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise errors.ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.num_classes < 0:
            raise errors.ConfigError(f"model.num_classes={self.num_classes} must be >= 0")
        factor = 2 ** (len(ch_mult) - 1)
        if image_size < 1 or image_size % factor != 0:
            raise errors.ConfigError(
                f"data.image_size={image_size} must be divisible by 2**(len(model.ch_mult)-1)"
                f"={factor} (model.ch_mult={ch_mult})"
            )
        resolutions = [image_size // 2**i for i in range(len(ch_mult))]
        bad = [r for r in self.attn_resolutions if r not in resolutions]
        if bad:
            raise errors.ConfigError(
                f"model.attn_resolutions={self.attn_resolutions}: {bad} never occur; the U-Net "
                f"resolutions for data.image_size={image_size} and model.ch_mult={ch_mult} "
                f"are {resolutions}"
            )
        if self.num_groups < 1:
            raise errors.ConfigError(f"model.num_groups={self.num_groups} must be >= 1")
        widths = sorted({ch, *(ch * m for m in ch_mult)})
        bad_w = [w for w in widths if w % self.num_groups != 0]
        if bad_w:
            raise errors.ConfigError(
                f"channel widths {bad_w} (model.ch={ch} x model.ch_mult={ch_mult}) are not "
                f"divisible by model.num_groups={self.num_groups}"
            )


# UNetConfig fields that fix the shapes of the parameters (checkpoint compatibility).
SHAPE_FIELDS = (
    "image_size",
    "in_channels",
    "out_channels",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "resamp_with_conv",
    "num_classes",
)


def apply_dropout(h: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout, active iff `key` is given and rate > 0."""
    if key is None or rate == 0.0:
        return h
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    return jnp.where(keep, h / (1.0 - rate), jnp.zeros_like(h)).astype(h.dtype)


class KeySequence:
    """Stand-in for `nnx.Rngs` in layer constructors: `.params()` -> fold_in(key, i), i = 1, 2...

    Flax layers only call `rngs.params()`. Drawing from one key with a Python counter
    avoids updating an `nnx.Rngs` counter variable once per parameter, which under tracing
    (`nnx.eval_shape`, jitted init) costs time quadratic in the number of layers.
    """

    def __init__(self, key: jax.Array):
        self.key = key
        self.count = 0

    def params(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


class _Layers:
    """Factory of the layers used by the U-Net, sharing dtype, init and GroupNorm settings."""

    def __init__(self, *, num_groups: int, eps: float, dtype, rngs: nnx.Rngs | KeySequence):
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype
        self.rngs = rngs

    def conv(
        self, cin: int, cout: int, *, k: int = 3, stride: int = 1, padding="SAME", scale=1.0
    ) -> nnx.Conv:
        return precision.Conv(
            cin,
            cout,
            (k, k),
            strides=stride,
            padding=padding,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=default_init(scale),
            rngs=self.rngs,
        )

    def dense(self, cin: int, cout: int, *, scale: float = 1.0) -> nnx.Linear:
        return precision.Linear(
            cin,
            cout,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=default_init(scale),
            rngs=self.rngs,
        )

    def norm(self, c: int) -> nnx.GroupNorm:
        # statistics, scale and bias in float32 (flax computes the normalisation in float32 and
        # casts its output to `dtype`), so the scale and bias gradients are float32 sums
        return nnx.GroupNorm(
            c,
            num_groups=self.num_groups,
            epsilon=self.eps,
            dtype=self.dtype,
            promote_dtype=precision.keep_parameters_float32,
            param_dtype=jnp.float32,
            rngs=self.rngs,
        )


class ResnetBlock(nnx.Module):
    """Residual block with timestep conditioning (official `resnet_block`). NHWC in/out."""

    def __init__(self, cin: int, cout: int, temb_ch: int, dropout: float, layers: _Layers):
        self.norm1 = layers.norm(cin)
        self.conv1 = layers.conv(cin, cout)
        self.temb_proj = layers.dense(temb_ch, cout)
        self.norm2 = layers.norm(cout)
        self.conv2 = layers.conv(cout, cout, scale=ZERO_INIT_SCALE)
        # 1x1 "network in network" projection of the shortcut when the width changes.
        self.nin_shortcut = layers.dense(cin, cout) if cin != cout else None
        self.dropout = dropout

    def __call__(self, x: jax.Array, temb: jax.Array, key: jax.Array | None) -> jax.Array:
        """x: [B, H, W, cin], temb: [B, temb_ch] -> [B, H, W, cout]."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.temb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = apply_dropout(jax.nn.silu(self.norm2(h)), self.dropout, key)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over the H*W positions (official `attn_block`). NHWC."""

    def __init__(self, c: int, layers: _Layers):
        self.norm = layers.norm(c)
        self.q = layers.dense(c, c)
        self.k = layers.dense(c, c)
        self.v = layers.dense(c, c)
        self.proj_out = layers.dense(c, c, scale=ZERO_INIT_SCALE)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C]; softmax(q k^T / sqrt(C)) v over the H*W positions.
        The logits are stored in the compute dtype and the softmax runs in float32, as
        improved-diffusion's fp16 attention does (bfloat16 logits: 2.4% less memory traffic,
        1.3% less time in the TPU step, BENCHMARKS.md); no head axis of 1, which costs the TPU
        layout copies."""
        b, hh, ww, c = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(b, hh * ww, c) for f in (self.q, self.k, self.v))
        logits = jnp.einsum("bqc,bkc->bqk", q, k)  # [B, H*W, H*W] in the compute dtype
        probs = jax.nn.softmax(logits.astype(jnp.float32) * jnp.float32(c**-0.5), axis=-1)
        probs = probs.astype(v.dtype)
        h = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(b, hh, ww, c)
        return x + self.proj_out(h)


class Downsample(nnx.Module):
    """Halve H and W: stride-2 3x3 conv with TF "SAME" padding (0, 1), or 2x2 average pool."""

    def __init__(self, c: int, with_conv: bool, layers: _Layers):
        self.conv = layers.conv(c, c, stride=2, padding=((0, 1), (0, 1))) if with_conv else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H/2, W/2, C]."""
        if self.conv is not None:
            return self.conv(x)
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Upsample(nnx.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv if `with_conv`."""

    def __init__(self, c: int, with_conv: bool, layers: _Layers):
        self.conv = layers.conv(c, c) if with_conv else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, 2H, 2W, C]."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x) if self.conv is not None else x


class Level(nnx.Module):
    """The residual blocks, attention blocks and resampler of one resolution level."""

    def __init__(self, blocks, attns, resample):
        self.blocks = nnx.List(blocks)
        self.attns = nnx.List(attns)
        self.resample = resample


class Middle(nnx.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, c: int, temb_ch: int, dropout: float, layers: _Layers):
        self.block_1 = ResnetBlock(c, c, temb_ch, dropout, layers)
        self.attn_1 = AttnBlock(c, layers)
        self.block_2 = ResnetBlock(c, c, temb_ch, dropout, layers)


class UNet(nnx.Module):
    """The DDPM U-Net. Call: `model(x, t, y=None, *, dropout_key=None) -> [B, H, W, C_out]`.

    Built from a validated `UNetConfig` (its docstring lists the hyper-parameters); `rngs`
    gives the parameter initialisation keys.
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        image_size, in_channels, out_channels = (
            config.image_size,
            config.in_channels,
            config.out_channels,
        )
        ch, ch_mult, num_res_blocks = config.ch, config.ch_mult, config.num_res_blocks
        attn_resolutions, dropout = config.attn_resolutions, config.dropout
        resamp_with_conv, num_groups = config.resamp_with_conv, config.num_groups
        norm_eps, num_classes, dtype = config.norm_eps, config.num_classes, config.dtype
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.ch = ch
        self.num_classes = num_classes
        self.compute_dtype = SUPPORTED_DTYPES[dtype]
        keys = KeySequence(rngs.params())
        layers = _Layers(num_groups=num_groups, eps=norm_eps, dtype=self.compute_dtype, rngs=keys)
        temb_ch = 4 * ch
        n_levels = len(ch_mult)

        self.temb_dense0 = layers.dense(ch, temb_ch)
        self.temb_dense1 = layers.dense(temb_ch, temb_ch)
        if num_classes > 0:
            # float32 lookup: its gradient (a scatter-add over the batch) sums in float32.
            self.class_embed = nnx.Embed(
                num_classes + 1,
                temb_ch,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                rngs=keys,
            )
        else:
            self.class_embed = None
        self.conv_in = layers.conv(in_channels, ch)

        # Down path; track the widths of the skip connections as the official code does.
        skip_ch = [ch]
        cur, res = ch, image_size
        down = []
        for i in range(n_levels):
            cout = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(cur, cout, temb_ch, dropout, layers))
                cur = cout
                if res in attn_resolutions:
                    attns.append(AttnBlock(cur, layers))
                skip_ch.append(cur)
            resample = None
            if i != n_levels - 1:
                resample = Downsample(cur, resamp_with_conv, layers)
                res //= 2
                skip_ch.append(cur)
            down.append(Level(blocks, attns, resample))
        self.down = nnx.List(down)

        self.mid = Middle(cur, temb_ch, dropout, layers)

        # Up path, built from the lowest resolution upwards; stored by level index so that
        # self.up[i] is the official `up_{i}`.
        up = [None] * n_levels
        for i in reversed(range(n_levels)):
            cout = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(cur + skip_ch.pop(), cout, temb_ch, dropout, layers))
                cur = cout
                if res in attn_resolutions:
                    attns.append(AttnBlock(cur, layers))
            resample = None
            if i != 0:
                resample = Upsample(cur, resamp_with_conv, layers)
                res *= 2
            up[i] = Level(blocks, attns, resample)
        self.up = nnx.List(up)

        self.norm_out = layers.norm(cur)
        self.conv_out = layers.conv(cur, out_channels, scale=ZERO_INIT_SCALE)

    def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array | None) -> None:
        want = (self.image_size, self.image_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"x must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {x.shape}"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [B]=({x.shape[0]},), got {t.shape}")
        if y is not None:
            if self.num_classes == 0:
                raise ValueError("class labels y given but model.num_classes=0 (unconditional)")
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape [B]=({x.shape[0]},), got {y.shape}")

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Predict from x_t.

        Args:
          x: [B, H, W, C] float, roughly in [-1, 1].
          t: [B] int timestep indices (0..T-1), embedded as given.
          y: [B] int class labels in 0..num_classes (num_classes = null class), or None
            (the null class when the model is conditional).
          dropout_key: a PRNG key to enable dropout (training); None disables it.

        Returns:
          [B, H, W, out_channels] float32.
        """
        t = jnp.asarray(t)
        self._check_inputs(x, t, y)
        dt = self.compute_dtype
        temb = timestep_embedding(t, self.ch).astype(dt)
        temb = self.temb_dense1(jax.nn.silu(self.temb_dense0(temb)))
        if self.class_embed is not None:
            if y is None:
                y = jnp.full((x.shape[0],), self.num_classes, dtype=jnp.int32)
            temb = temb + self.class_embed(y).astype(dt)

        block_index = itertools.count()

        def key() -> jax.Array | None:
            """Dropout key of the next residual block: fold_in(dropout_key, block index)."""
            i = next(block_index)
            return None if dropout_key is None else jax.random.fold_in(dropout_key, i)

        hs = [self.conv_in(x.astype(dt))]
        for level in self.down:
            for j, block in enumerate(level.blocks):
                h = block(hs[-1], temb, key())
                if len(level.attns):
                    h = level.attns[j](h)
                hs.append(h)
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))

        h = self.mid.block_1(hs[-1], temb, key())
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb, key())

        for level in reversed(self.up):
            for j, block in enumerate(level.blocks):
                h = block(jnp.concatenate([h, hs.pop()], axis=-1), temb, key())
                if len(level.attns):
                    h = level.attns[j](h)
            if level.resample is not None:
                h = level.resample(h)
        assert not hs

        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return h.astype(jnp.float32)
