"""Where the FID Inception weights come from: an explicit path, the project's cache, or one
download of pytorch-fid's release file checked by its sha256 prefix.

The download's connection phase runs in a helper thread so that a machine with no network
(name resolution that hangs) is told what to do within seconds instead of hanging.
"""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusion_jax.runtime import errors, files
from diffusion_jax.runtime.cache import default_cache_dir

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)
# torch hub convention: the file name carries the first hex digits of the file's sha256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"


class InceptionWeightsUnavailable(errors.UserError):
    """The FID Inception weights file is neither given, nor cached, nor downloadable."""


def _urlopen_bounded(url: str, timeout: float) -> Any:
    """``urllib.request.urlopen`` whose connection phase (DNS included) ends after ``timeout``.

    The socket timeout bounds each read, the thread join bounds name resolution, which the
    socket timeout does not cover.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["response"] = urllib.request.urlopen(url, timeout=timeout)
        except BaseException as err:  # reported to the caller below
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if "response" in result:
        return result["response"]
    if "error" in result:
        raise result["error"]
    raise TimeoutError(f"no connection to {url} within {timeout} s")


def download_url(url: str, destination: Path, timeout: float = 5.0) -> None:
    """Download ``url`` to ``destination`` (overwritten). Raises on any network error."""
    with _urlopen_bounded(url, timeout) as response, open(destination, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _unavailable_message(target: Path, reason: str) -> str:
    return (
        f"FID Inception weights unavailable ({reason}).\n"
        f"Put the file {FID_WEIGHTS_FILENAME} at\n  {target}\n"
        f"(the cache directory is $DIFFUSION_JAX_CACHE, default ~/.cache/diffusion_jax), or pass "
        "its path explicitly. Get it from pytorch-fid's release:\n"
        f"  {FID_WEIGHTS_URL}\n"
        f"(its sha256 starts with {FID_WEIGHTS_SHA256_PREFIX})."
    )


def inception_weights_path(
    explicit_path: str = "",
    *,
    download: Callable[[str, Path], None] | None = download_url,
) -> Path:
    """Locate the FID Inception weights, downloading them into the cache if needed.

    Order: ``explicit_path`` if non-empty (must exist); else the cached
    ``default_cache_dir() / FID_WEIGHTS_FILENAME``; else, unless ``download`` is None or
    ``$DIFFUSION_JAX_OFFLINE`` is set to a non-empty value other than ``0``, download
    :data:`FID_WEIGHTS_URL` with ``download(url, tmp_path)`` (5 s connection timeout by
    default) to a temporary file in the cache, check its sha256 prefix, and rename it into
    place atomically.

    Raises:
      InceptionWeightsUnavailable: with where to put the file and where to get it.
    """
    if explicit_path:
        path = Path(explicit_path).expanduser()
        if path.is_file():
            return path
        raise InceptionWeightsUnavailable(
            _unavailable_message(path, f"no file at the given path {path}")
        )
    target = default_cache_dir() / FID_WEIGHTS_FILENAME
    if target.is_file():
        return target
    offline = os.environ.get("DIFFUSION_JAX_OFFLINE", "") not in ("", "0")
    if download is None or offline:
        raise InceptionWeightsUnavailable(
            _unavailable_message(target, "not cached and downloads are disabled")
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_path(target) as tmp:
            download(FID_WEIGHTS_URL, tmp)
            digest = _sha256(tmp)
            if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
                raise errors.InputError(f"downloaded file has sha256 {digest}")
    except Exception as err:
        raise InceptionWeightsUnavailable(
            _unavailable_message(target, f"not cached and the download failed: {err!r}")
        ) from err
    return target
