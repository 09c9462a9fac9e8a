"""Image codecs: 16-bit TIFF (single page or multi-page, LZW via imagecodecs) and 8-bit PNG.

Every reader takes an fsspec URL and returns the same 2-D array whatever the store
(local disk, S3, GCS): the bytes are fetched whole and decoded in memory.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from raycp.errors import InputError
from raycp.io import urls

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageReadError(InputError):
    """A channel image cannot be read; the site holding it is quarantined with this reason."""


@dataclass(frozen=True)
class PlaneRef:
    """Where one channel's plane lives, addressed as CellProfiler's LoadData addresses it:
    ``URL_<ch>`` (the file), ``Series_<ch>`` (the image series of a multi-series file, 0-based),
    ``Frame_<ch>`` (the plane within that series, 0-based) and ``Channel_<ch>`` (one channel of a
    multi-channel plane such as RGB, 0-based; -1 = the plane is grey-level)."""

    url: str
    frame: int = 0
    series: int = 0
    channel: int = -1


def decode_image(data: bytes, *, url: str = "<bytes>", frame: int = 0, series: int = 0,
                 channel: int = -1) -> np.ndarray:
    """Decode TIFF or PNG bytes into the 2-D plane addressed by ``series``/``frame``/``channel``
    (see :class:`PlaneRef`), in the stored dtype."""
    if data[:4] in _TIFF_MAGIC:
        return _decode_tiff(data, url=url, frame=frame, series=series, channel=channel)
    if data[:8] == _PNG_MAGIC:
        if frame or series:
            raise ImageReadError(f"{url}: frame {frame} / series {series} asked for, but a PNG holds one image",
                                 fix="set the index's Frame_/Series_ columns to 0 for PNG files")
        return _decode_png(data, url=url, channel=channel)
    raise ImageReadError(
        f"{url}: not a TIFF or PNG file (starts with {data[:8]!r})",
        fix="point the index at the 16-bit TIFF (or compressed PNG) images",
    )


def read_plane(ref: PlaneRef) -> tuple[np.ndarray, int]:
    """Read one addressed plane from any fsspec URL: the 2-D array and the bytes fetched."""
    try:
        data = urls.read_bytes(ref.url)
    except FileNotFoundError:
        raise ImageReadError(f"{ref.url}: file not found", fix="check the index's image URLs") from None
    return decode_image(data, url=ref.url, frame=ref.frame, series=ref.series, channel=ref.channel), len(data)


def read_image(url: str, *, frame: int = 0, series: int = 0, channel: int = -1) -> np.ndarray:
    """Read one channel image from any fsspec URL as a 2-D array."""
    return read_plane(PlaneRef(url, frame, series, channel))[0]


def check_site_planes(planes: list[np.ndarray], names: list[str]) -> None:
    """All channels of a site must share shape and dtype; else an :class:`ImageReadError` naming
    the first file that differs from the first channel."""
    first = planes[0]
    for name, plane in zip(names[1:], planes[1:]):
        if plane.shape != first.shape:
            raise ImageReadError(f"{name}: shape {plane.shape} differs from {names[0]} {first.shape}",
                                 fix="all channels of a site must have the same size")
        if plane.dtype != first.dtype:
            raise ImageReadError(f"{name}: dtype {plane.dtype} differs from {names[0]} {first.dtype}",
                                 fix="all channels of a site must have the same bit depth")


def read_site(channel_urls: list[str] | list[PlaneRef], frames: list[int] | None = None) -> np.ndarray:
    """Read a site's channels into one ``C×H×W`` array; all channels must share shape and dtype.

    ``channel_urls``: plain URLs (with ``frames``, default page 0) or :class:`PlaneRef` s."""
    frames = frames if frames is not None else [0] * len(channel_urls)
    refs = [u if isinstance(u, PlaneRef) else PlaneRef(u, int(f))
            for u, f in zip(channel_urls, frames, strict=True)]
    planes = [read_plane(r)[0] for r in refs]
    check_site_planes(planes, [r.url for r in refs])
    return np.stack(planes)


def _decode_tiff(data: bytes, *, url: str, frame: int, series: int, channel: int) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            n_pages = len(tif.pages)
            if n_pages == 0:
                raise ImageReadError(
                    f"{url}: unreadable TIFF (no readable page: the file is truncated or corrupt)",
                    fix="re-export or re-upload the image; truncated uploads are the usual cause",
                )
            pages = tif.pages
            if series:
                if series >= len(tif.series):
                    raise ImageReadError(
                        f"{url}: series {series} asked for but the TIFF has {len(tif.series)} series",
                        fix="check the index's Series_<channel> column (series are numbered from 0)",
                    )
                pages = tif.series[series].pages
            if frame >= len(pages):
                where = f"series {series} of the TIFF has" if series else "the TIFF has"
                raise ImageReadError(
                    f"{url}: frame {frame} asked for but {where} {len(pages)} page(s)",
                    fix="check the index's Frame_<channel> column (frames are numbered from 0)",
                )
            page = pages[frame]
            array = page.asarray()
            if channel >= 0:
                array = _select_channel(array, getattr(page, "samplesperpixel", 1), getattr(page, "planarconfig", 1),
                                        channel, url=url)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for corrupt files
        raise ImageReadError(
            f"{url}: unreadable TIFF ({type(exc).__name__}: {exc})",
            fix="re-export or re-upload the image; truncated uploads are the usual cause",
        ) from None
    return _as_plane(array, url=url)


def _select_channel(array: np.ndarray, samples: int, planar: int, channel: int, *, url: str) -> np.ndarray:
    """Channel ``channel`` of a multi-sample plane (RGB or similar): the last axis when samples are
    interleaved (contig), the first when they are stored plane by plane (separate)."""
    if samples <= 1 or array.ndim != 3:
        if channel == 0 and np.squeeze(array).ndim == 2:
            return array  # a grey plane is its own channel 0, as CellProfiler reads it
        raise ImageReadError(f"{url}: channel {channel} asked for but the plane has {max(samples, 1)} channel(s)",
                             fix="check the index's Channel_<channel> column (-1 for a grey-level image)")
    if channel >= samples:
        raise ImageReadError(f"{url}: channel {channel} asked for but the plane has {samples} channels",
                             fix="check the index's Channel_<channel> column (channels are numbered from 0)")
    separate = int(planar) == 2
    return array[channel] if separate else array[..., channel]


def _decode_png(data: bytes, *, url: str, channel: int = -1) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            array = np.asarray(img)
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"{url}: unreadable PNG ({type(exc).__name__}: {exc})",
                             fix="re-run the compression stage for this site") from None
    if channel >= 0:
        array = _select_channel(array, array.shape[-1] if array.ndim == 3 else 1, 1, channel, url=url)
    return _as_plane(array, url=url)


def _as_plane(array: np.ndarray, *, url: str) -> np.ndarray:
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ImageReadError(
            f"{url}: expected one grey-level plane, got an array of shape {array.shape}",
            fix="store one channel per file or page, or name the channel with the index's Channel_<channel> column",
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
