"""Pictures: image grids and strips as PNG (NHWC float images in [-1, 1])."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255], rounding as the official code (x * 127.5 + 127.5)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8
    )


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles [N, H, W, C] images into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] uint8 image."""
    images = to_uint8(images) if images.dtype != np.uint8 else images
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def grid_image(images: np.ndarray, ncol: int | None = None) -> np.ndarray:
    """[N, H, W, C] images in [-1, 1] (or uint8) -> one uint8 grid, enlarged so that small
    images show (8x8 digits become 16x larger)."""
    images = np.asarray(images)
    grid = make_grid(images, ncol)
    upscale = max(1, 256 // max(images.shape[1], 1) // 2)
    return grid.repeat(upscale, axis=0).repeat(upscale, axis=1)


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Writes an [H, W, C] uint8 image (C = 1, 3 or 4) as PNG (local or gs:// paths)."""
    from etils import epath
    from PIL import Image

    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    with epath.Path(path).open("wb") as f:
        img.save(f, format="PNG")


def _figure_image(fig) -> np.ndarray:
    """A matplotlib figure -> uint8 [H, W, 3], and the figure closed."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_image(points: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """2-D points [N, 2] (and optional reference data in grey) as a uint8 scatter plot."""
    fig, ax = _pyplot().subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.75", label="data")
    ax.scatter(points[:, 0], points[:, 1], s=2, c="C0", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return _figure_image(fig)


def picture(samples: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """The picture of a batch of samples: a grid of images [N, H, W, C], or a scatter plot
    of points [N, D] over `reference` data."""
    samples = np.asarray(samples)
    return scatter_image(samples, reference) if samples.ndim == 2 else grid_image(samples)


def rate_distortion_image(rate: np.ndarray, distortion: np.ndarray) -> np.ndarray:
    """DDPM Fig. 5 as one uint8 image of three panels, from arrays indexed by timestep
    i = 0..T-1.

    `rate` [T] (bits/dim received once x_{i+1} is known) and `distortion` [T] (RMSE of
    x0_hat(x_{i+1}) on the 0-255 scale), as `likelihood.rate_distortion` returns them.
    Panels: distortion vs reverse process steps T - 1 - i, rate vs reverse steps, and
    distortion vs rate.
    """
    rate = np.asarray(rate, np.float64)
    distortion = np.asarray(distortion, np.float64)
    steps = rate.shape[0] - 1 - np.arange(rate.shape[0])
    fig, axes = _pyplot().subplots(1, 3, figsize=(12, 3.4), dpi=100)
    panels = (
        (steps, distortion, "Reverse process steps (T - t)", "Distortion (RMSE [0, 255])"),
        (steps, rate, "Reverse process steps (T - t)", "Rate (bits/dim)"),
        (rate, distortion, "Rate (bits/dim)", "Distortion (RMSE [0, 255])"),
    )
    for ax, (x, y, xlabel, ylabel) in zip(axes, panels, strict=True):
        ax.plot(x, y, color="C0")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_image(fig)


def save_grid(images: np.ndarray, path: str | Path, ncol: int | None = None) -> np.ndarray:
    """Saves [N, H, W, C] images in [-1, 1] as one PNG grid (`grid_image`); returns it."""
    grid = grid_image(images, ncol)
    save_png(grid, path)
    return grid
