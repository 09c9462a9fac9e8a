"""Where a run keeps its files. Today: the listing of per-site files that every resumable stage
uses to know which sites are finished; the stages' folders and the run's ``RunLayout`` come with
the orchestration issue (#13)."""

from __future__ import annotations

from raycp.io import urls


def list_site_files(folder: str, suffix: str) -> set[tuple[str, str, int]]:
    """``(plate, well, site)`` of every ``<folder>/<plate>/<well>_<site><suffix>`` in one listing
    (no per-site probes; object-store listings are re-read, not cached). Hidden and temporary
    files are ignored, so a write in progress never counts as finished."""
    fs, path = urls.filesystem(folder)
    fs.invalidate_cache(path)
    try:
        found = fs.find(path)
    except FileNotFoundError:
        return set()
    out = set()
    for p in found:
        parts = p.rstrip("/").split("/")
        name = parts[-1]
        if len(parts) < 2 or not name.endswith(suffix) or name.startswith("."):
            continue
        well, _, site = name[: -len(suffix)].rpartition("_")
        if site.isdigit() and well:
            out.add((parts[-2], well, int(site)))
    return out
