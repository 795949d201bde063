"""Sample-quality metrics: FID and Inception Score with the FID Inception v3 network.

``fid`` holds the float64 numpy statistics (FID, IS, ``.npz`` statistics files);
``inception`` holds the Flax NNX Inception v3 and its pytorch-fid weight loader.
"""

from diffusion_jax.metrics.fid import (
    compute_statistics,
    frechet_distance,
    inception_score,
    load_statistics,
    save_statistics,
)
from diffusion_jax.metrics.inception import (
    InceptionV3,
    InceptionWeightsUnavailable,
    inception_weights_path,
    load_inception_params,
    make_feature_fn,
    params_from_state_dict,
    preprocess,
)

__all__ = [
    "InceptionV3",
    "InceptionWeightsUnavailable",
    "compute_statistics",
    "frechet_distance",
    "inception_score",
    "inception_weights_path",
    "load_inception_params",
    "load_statistics",
    "make_feature_fn",
    "params_from_state_dict",
    "preprocess",
    "save_statistics",
]
