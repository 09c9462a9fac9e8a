"""Compression (paper Methods, "image preprocessing"): illumination-corrected images stretched to
their own 0.05 and 99.95 percentiles, 16 → 8 bit, saved as lossless PNG (paper: ~2× × ~3× ≈ 6×).

The same 8-bit conversion feeds the crops, so a crop's pixels equal the compressed image's.
"""

from __future__ import annotations

import io

import numpy as np

from raycp.preprocess.illumination import check_function, correct


def stretch_limits(plane: np.ndarray, low: float = 0.05, high: float = 99.95) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of one image, exactly ``np.percentile`` (linear
    interpolation), without sorting the image: a 1/64 sample brackets each tail, then only the
    few pixels in the bracket are partially sorted (falls back to a full partition if the bracket
    misses, e.g. for heavily tied images)."""
    flat = plane.reshape(-1)
    return _interpolated(flat.size, low, high, lambda ranks: _ranked_values(flat, ranks))


def _interpolated(n: int, low: float, high: float, ranked) -> tuple[float, float]:
    """``np.percentile``'s linear interpolation at ``low`` and ``high`` of ``n`` values, given
    ``ranked(ranks) -> {rank: value}`` for the (at most four) ranks it needs."""
    positions = [q / 100.0 * (n - 1) for q in (low, high)]
    values = ranked(sorted({min(n - 1, int(np.floor(p)) + d) for p in positions for d in (0, 1)}))
    out = []
    for p in positions:
        i = int(np.floor(p))
        lo_v, hi_v = values[i], values[min(n - 1, i + 1)]
        out.append(lo_v + (hi_v - lo_v) * (p - i))
    return out[0], out[1]


def _ranked_values(flat: np.ndarray, ranks: list[int]) -> dict[int, float]:
    """``{rank: value}`` of the sorted ``flat`` for a few ranks."""
    n = flat.size
    if n < 1 << 16:
        part = np.partition(flat, ranks)
        return {r: float(part[r]) for r in ranks}
    sample = np.sort(flat[::64])
    m = sample.size
    margin = 4.0 * np.sqrt(m) + 16  # many standard deviations of a sample rank
    out: dict[int, float] = {}
    for r in ranks:
        if r in out:
            continue
        q = r / (n - 1)
        if q <= 0.5:  # lower tail: every pixel <= t sits at ranks 0 .. len(sub) - 1
            t = sample[min(m - 1, int(q * (m - 1) + margin))]
            sub = flat[flat <= t]
            offset = 0
        else:  # upper tail: every pixel >= t sits at ranks n - len(sub) .. n - 1
            t = sample[max(0, int(q * (m - 1) - margin))]
            sub = flat[flat >= t]
            offset = n - sub.size
        near = [k for k in ranks if offset <= k < offset + sub.size and (k <= r + 1 and k >= r - 1)]
        if r not in near:
            part = np.partition(flat, ranks)
            return {k: float(part[k]) for k in ranks}
        part = np.partition(sub, [k - offset for k in near])
        out.update({k: float(part[k - offset]) for k in near})
    return out


def to_uint8(plane: np.ndarray, lo: float, hi: float, *, inplace: bool = False) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto 0..255 (clipped, rounded); a flat image gives zeros.

    With ``inplace`` a float32 ``plane`` is used as scratch space (and destroyed)."""
    if not hi > lo:
        return np.zeros(plane.shape, dtype=np.uint8)
    work = plane if (inplace and plane.dtype == np.float32) else plane.astype(np.float32, copy=True)
    work -= np.float32(lo)
    work *= np.float32(255.0 / (hi - lo))
    np.maximum(work, np.float32(0.0), out=work)
    np.minimum(work, np.float32(255.0), out=work)
    work += np.float32(0.5)
    return work.astype(np.uint8)


def compress_plane(plane: np.ndarray, function: np.ndarray | None = None, *, low: float = 0.05,
                   high: float = 99.95, keep_corrected: bool = True, out: np.ndarray | None = None,
                   scratch: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, float, float]:
    """Correct one channel and stretch it to 8 bits: ``(uint8, corrected float32 or None, lo, hi)``.

    8- and 16-bit planes take the loops of :mod:`raycp.preprocess._kernels` (three passes over
    the plane, the same numbers); other dtypes the numpy path (:func:`compress_plane_numpy`).
    ``out`` (uint8) and ``scratch`` (float32, used when the corrected plane is not kept) are
    optional buffers of the plane's shape, so a site's channels reuse their memory."""
    if plane.dtype not in (np.uint8, np.uint16) or plane.ndim != 2:
        return _numpy_into(plane, function, low, high, keep_corrected, out)
    if function is not None:
        check_function(plane, function)
    from raycp.preprocess import _kernels as k

    reuse = scratch is not None and not keep_corrected and scratch.shape == plane.shape
    corrected = scratch if reuse else np.empty(plane.shape, dtype=np.float32)
    if function is None:
        corrected[...] = plane
    else:
        np.divide(plane, function, out=corrected, dtype=np.float32)
    hist = np.zeros(k.N_BINS, dtype=np.int64)
    if k.count_bins(corrected.reshape(-1), hist):  # NaN, inf or a function below 1: numpy's path
        return _numpy_into(plane, function, low, high, keep_corrected, out)
    lo, hi = _limits_from_bins(corrected, hist, low, high)
    if out is None:
        out = np.empty(plane.shape, dtype=np.uint8)
    if hi > lo:
        k.stretch_to_uint8(corrected, np.float32(lo), np.float32(255.0 / (hi - lo)), out)
    else:
        out[:] = 0
    return out, (corrected if keep_corrected else None), lo, hi


def _numpy_into(plane, function, low, high, keep_corrected, out):
    u8, corrected, lo, hi = compress_plane_numpy(plane, function, low=low, high=high, keep_corrected=keep_corrected)
    if out is not None:
        out[...] = u8
        u8 = out
    return u8, corrected, lo, hi


def _limits_from_bins(values: np.ndarray, hist: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """:func:`stretch_limits` from a histogram of ``floor(values)``: only the values of the (at
    most four) integer bins holding the needed ranks are gathered and sorted."""
    from raycp.preprocess import _kernels as k

    def ranked(ranks: list[int]) -> dict[int, float]:
        cumulative = np.cumsum(hist)
        bins = [int(np.searchsorted(cumulative, r, side="right")) for r in ranks]
        wanted = sorted(set(bins))
        slot = np.full(k.N_BINS, -1, dtype=np.int32)
        slot[wanted] = np.arange(len(wanted), dtype=np.int32)
        gathered, starts = k.gather_bins(values, slot, hist[wanted].astype(np.int64))
        groups = [np.sort(gathered[starts[j]:starts[j + 1]]) for j in range(len(wanted))]
        return {r: float(groups[wanted.index(b)][r - (int(cumulative[b - 1]) if b else 0)])
                for r, b in zip(ranks, bins)}

    return _interpolated(values.size, low, high, ranked)


def compress_plane_numpy(plane: np.ndarray, function: np.ndarray | None = None, *, low: float = 0.05,
                         high: float = 99.95, keep_corrected: bool = True
                         ) -> tuple[np.ndarray, np.ndarray | None, float, float]:
    """:func:`compress_plane` in numpy: any dtype, and the reference the fused loops are tested on."""
    corrected = correct(plane, function)
    lo, hi = stretch_limits(corrected, low, high)
    if keep_corrected:
        return to_uint8(corrected, lo, hi), corrected, lo, hi
    return to_uint8(corrected, lo, hi, inplace=True), None, lo, hi


def compress_site(site, functions: np.ndarray | None = None, *, low: float = 0.05,
                  high: float = 99.95, keep_float: int | None = None, buffers: dict | None = None
                  ) -> tuple[np.ndarray, list[tuple[float, float]], np.ndarray | None]:
    """``C×H×W`` (array or list of planes) → ``(C×H×W uint8, [(lo, hi)] per channel, corrected
    float32 plane number keep_float)``.

    Channels are processed one at a time, so at most one float32 plane is alive besides the
    one asked for with ``keep_float`` (the DNA channel for nuclei detection). ``buffers`` (a dict
    the caller keeps) holds the uint8 site and the float32 scratch plane for the next site of the
    same shape, which then overwrites the returned site: a worker that keeps it spares each site
    the page faults of ~10 MB of fresh memory.
    """
    planes = list(site)
    shape = (len(planes), *planes[0].shape)
    store = buffers if buffers is not None else {}
    if store.get("out") is None or store["out"].shape != shape:
        store["out"] = np.empty(shape, dtype=np.uint8)
        store["scratch"] = np.empty(shape[1:], dtype=np.float32)
    out, scratch = store["out"], store["scratch"]
    limits = []
    kept = None
    for c, plane in enumerate(planes):
        keep = keep_float == c
        _, corrected, lo, hi = compress_plane(plane, None if functions is None else functions[c], low=low,
                                              high=high, keep_corrected=keep, out=out[c], scratch=scratch)
        limits.append((lo, hi))
        if keep:
            kept = corrected
    return out, limits, kept


def site_to_u8(planes: list[np.ndarray], functions: np.ndarray | None, *, compressed: bool, dna: int | None,
               low: float, high: float, source: str, buffers: dict | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """A site's planes as ``C×H×W`` uint8 plus the float32 DNA plane for nuclei detection: as
    stored when the index is compressed already (8-bit PNGs), else corrected and stretched
    (:func:`compress_site`). ``source`` names the site in the error for 16-bit planes in a
    compressed index. ``buffers`` as in :func:`compress_site`."""
    if compressed:
        if planes[0].dtype != np.uint8:
            from raycp.io.images import ImageReadError

            raise ImageReadError(f"{source}: compressed index but {planes[0].dtype} pixels",
                                 fix="point at the sites.parquet written by `raycp preprocess compress`")
        u8 = np.stack(planes)
        return u8, (u8[dna].astype(np.float32) if dna is not None else None)
    u8, _, dna_plane = compress_site(planes, functions, low=low, high=high, keep_float=dna, buffers=buffers)
    return u8, dna_plane


def histogram(plane_u8: np.ndarray) -> np.ndarray:
    """256-bin intensity histogram (int64) of an 8-bit image."""
    return np.bincount(plane_u8.reshape(-1), minlength=256).astype(np.int64)


def histogram_percentiles(counts: np.ndarray, percentiles=(1.0, 50.0, 99.0)) -> list[int]:
    """Intensity (0..255) at each percentile of a 256-bin histogram (the first bin reaching it)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return [0 for _ in percentiles]
    cumulative = np.cumsum(counts)
    return [int(np.searchsorted(cumulative, p / 100.0 * total)) for p in percentiles]


def png_bytes(plane_u8: np.ndarray, level: int = 6) -> bytes:
    """Lossless PNG of an 8-bit plane; deterministic (no timestamp or text chunks)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(plane_u8).save(buf, format="PNG", optimize=False, compress_level=level)
    return buf.getvalue()
