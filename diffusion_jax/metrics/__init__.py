"""Sample-quality metrics, in numpy or pure JAX, independent of how the samples were made.

- `frechet`: Frechet distance (FID) and Inception Score from features, float64 numpy, and the
  `.npz` statistics files of pytorch-fid and TTUR.
- `inception`: the FID Inception v3 network in Flax NNX; `inception_weights`: where its weights
  come from (a path, the cache, one checked download).
- `digits`, `points`: the metrics of the data the project ships (a small classifier's feature
  space for 8x8 digits; energy distance and MMD for the swiss roll); `dataset_quality` picks
  the one that fits a batch of samples.
"""
