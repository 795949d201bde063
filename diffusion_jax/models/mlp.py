"""A small MLP denoiser for low-dimensional toy data (e.g. the 2-D swiss roll).

Same role and call signature as the U-Net (DDPM section 3; the toy experiments of
Sohl-Dickstein et al. 2015 use such networks): x [B, D], t [B] -> [B, out_dim].
The timestep enters through the sinusoidal embedding of the DDPM U-Net (Ho et al. 2020, §4)
followed by Dense-swish-Dense, and is added to every hidden layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import precision
from diffusion_jax.models.unet import SUPPORTED_DTYPES, apply_dropout, timestep_embedding
from diffusion_jax.runtime import errors


class MLPDenoiser(nnx.Module):
    """MLP eps/x0 predictor. Call: `model(x, t, y=None, *, dropout_key=None) -> [B, out_dim]`.

    Args (keyword only):
      data_dim: D, the width of x (`config.data.channels`, 2 for the swiss roll).
      out_dim: output width (2 * D for a learned variance).
      hidden: width of the hidden layers (`config.model.hidden`).
      depth: number of hidden layers (`config.model.depth`), each swish(Dense(h) + temb).
      num_classes: 0 = unconditional; otherwise num_classes + 1 embeddings (last = null).
      dropout: dropout rate on the hidden layers, active only with a dropout_key.
      dtype: compute dtype "float32" | "bfloat16" (`precision.affine`: float32 parameters
        and gradient sums).
    """

    def __init__(
        self,
        *,
        data_dim: int,
        out_dim: int,
        hidden: int = 128,
        depth: int = 3,
        num_classes: int = 0,
        dropout: float = 0.0,
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        if dtype not in SUPPORTED_DTYPES:
            allowed = sorted(SUPPORTED_DTYPES)
            raise errors.ConfigError(
                f"model.dtype={dtype!r} is not supported; expected one of {allowed}"
            )
        if hidden < 2 or depth < 1:
            raise errors.ConfigError(
                f"model.hidden={hidden} must be >= 2 and model.depth={depth} >= 1"
            )
        if data_dim < 1 or out_dim < 1:
            raise errors.ConfigError(
                f"data dim {data_dim} and output dim {out_dim} must be positive"
            )
        if not 0.0 <= dropout < 1.0:
            raise errors.ConfigError(f"model.dropout={dropout} must be in [0, 1)")
        self.data_dim = data_dim
        self.hidden = hidden
        self.num_classes = num_classes
        self.dropout = dropout
        dt = SUPPORTED_DTYPES[dtype]
        self.compute_dtype = dt

        def dense(i: int, o: int) -> nnx.Linear:
            return precision.Linear(i, o, dtype=dt, param_dtype=jnp.float32, rngs=rngs)

        self.temb_dense0 = dense(hidden, hidden)
        self.temb_dense1 = dense(hidden, hidden)
        self.class_embed = (
            nnx.Embed(num_classes + 1, hidden, param_dtype=jnp.float32, rngs=rngs)
            if num_classes > 0
            else None
        )
        self.dense_in = dense(data_dim, hidden)
        self.layers = nnx.List([dense(hidden, hidden) for _ in range(depth)])
        self.temb_proj = nnx.List([dense(hidden, hidden) for _ in range(depth)])
        self.dense_out = dense(hidden, out_dim)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """x: [B, D] float, t: [B] int, y: [B] int or None -> [B, out_dim] float32."""
        t = jnp.asarray(t)
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"x must have shape [B, {self.data_dim}], got {x.shape}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [B]=({x.shape[0]},), got {t.shape}")
        if y is not None and self.num_classes == 0:
            raise ValueError("class labels y given but model.num_classes=0 (unconditional)")
        dt = self.compute_dtype
        temb = timestep_embedding(t, self.hidden).astype(dt)
        temb = self.temb_dense1(jax.nn.silu(self.temb_dense0(temb)))
        if self.class_embed is not None:
            if y is None:
                y = jnp.full((x.shape[0],), self.num_classes, dtype=jnp.int32)
            temb = temb + self.class_embed(y).astype(dt)
        h = self.dense_in(x.astype(dt))
        for i, (layer, proj) in enumerate(zip(self.layers, self.temb_proj, strict=True)):
            h = jax.nn.silu(layer(h) + proj(jax.nn.silu(temb)))
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            h = apply_dropout(h, self.dropout, key)
        return self.dense_out(h).astype(jnp.float32)
