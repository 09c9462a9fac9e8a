"""Image codecs: 16-bit TIFF (single page or multi-page, LZW via imagecodecs) and 8-bit PNG.

Every reader takes an fsspec URL and returns the same 2-D array whatever the store
(local disk, S3, GCS): the bytes are fetched whole and decoded in memory.
"""

from __future__ import annotations

import io

import numpy as np

from raycp.errors import InputError
from raycp.io import urls

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageReadError(InputError):
    """A channel image cannot be read; the site holding it is quarantined with this reason."""


def decode_image(data: bytes, *, url: str = "<bytes>", frame: int = 0) -> np.ndarray:
    """Decode TIFF (page ``frame``) or PNG bytes into a 2-D array of the stored dtype."""
    if data[:4] in _TIFF_MAGIC:
        return _decode_tiff(data, url=url, frame=frame)
    if data[:8] == _PNG_MAGIC:
        return _decode_png(data, url=url)
    raise ImageReadError(
        f"{url}: not a TIFF or PNG file (starts with {data[:8]!r})",
        fix="point the index at the 16-bit TIFF (or compressed PNG) images",
    )


def read_image(url: str, *, frame: int = 0) -> np.ndarray:
    """Read one channel image from any fsspec URL as a 2-D array."""
    try:
        data = urls.read_bytes(url)
    except FileNotFoundError:
        raise ImageReadError(f"{url}: file not found", fix="check the index's image URLs") from None
    return decode_image(data, url=url, frame=frame)


def read_site(channel_urls: list[str], frames: list[int] | None = None) -> np.ndarray:
    """Read a site's channels into one ``C×H×W`` array; all channels must share shape and dtype."""
    frames = frames if frames is not None else [0] * len(channel_urls)
    planes = [read_image(u, frame=f) for u, f in zip(channel_urls, frames, strict=True)]
    first = planes[0]
    for url, plane in zip(channel_urls[1:], planes[1:]):
        if plane.shape != first.shape:
            raise ImageReadError(
                f"{url}: shape {plane.shape} differs from {channel_urls[0]} {first.shape}",
                fix="all channels of a site must have the same size",
            )
        if plane.dtype != first.dtype:
            raise ImageReadError(
                f"{url}: dtype {plane.dtype} differs from {channel_urls[0]} {first.dtype}",
                fix="all channels of a site must have the same bit depth",
            )
    return np.stack(planes)


def _decode_tiff(data: bytes, *, url: str, frame: int) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            n_pages = len(tif.pages)
            if n_pages == 0:
                raise ImageReadError(
                    f"{url}: unreadable TIFF (no readable page: the file is truncated or corrupt)",
                    fix="re-export or re-upload the image; truncated uploads are the usual cause",
                )
            if frame >= n_pages:
                raise ImageReadError(
                    f"{url}: frame {frame} asked for but the TIFF has {n_pages} page(s)",
                    fix="check the index's Frame_<channel> column",
                )
            array = tif.pages[frame].asarray()
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for corrupt files
        raise ImageReadError(
            f"{url}: unreadable TIFF ({type(exc).__name__}: {exc})",
            fix="re-export or re-upload the image; truncated uploads are the usual cause",
        ) from None
    return _as_plane(array, url=url)


def _decode_png(data: bytes, *, url: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            array = np.asarray(img)
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"{url}: unreadable PNG ({type(exc).__name__}: {exc})",
                             fix="re-run the compression stage for this site") from None
    return _as_plane(array, url=url)


def _as_plane(array: np.ndarray, *, url: str) -> np.ndarray:
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ImageReadError(
            f"{url}: expected one grey-level plane, got an array of shape {array.shape}",
            fix="store one channel per file, or one channel per page of a multi-page TIFF",
        )
    if array.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(
            f"{url}: unsupported dtype {array.dtype}",
            fix="images must be 8-bit or 16-bit unsigned integers",
        )
    return array


def encode_png(plane: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8/uint16 plane (deterministic: no timestamps)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(plane).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
