"""Where a run keeps its files: :class:`RunLayout` owns every URL under a run's output
(``data.output``), so a sweep trial or a cluster job is one ``data.output`` override, and
:func:`list_site_files` is the one listing every resumable stage uses to know which sites are done.

A run on disk (``<run>`` = ``data.output``)::

    <run>/config.yaml                               resolved config (no secrets)
    <run>/index/screen.parquet                      the index snapshot
    <run>/illum/<plate>/<channel>.npy, plate.json   illumination functions (plate × channel)
    <run>/compressed/<plate>/<well>/<site>/<ch>.png + sites.parquet (a compressed index)
    <run>/nuclei/<plate>/<well>_<site>.parquet      nuclei centres (CellProfiler column names)
    <run>/crops/<plate>/<well>_<site>.parquet       crops + manifest.parquet, labels.json
    <run>/train/<name>/epoch_*/, train/model/       checkpoints, the exported CNN, reports
    <run>/features/<set>/sites/, sites.parquet      per-site features and site profiles
    <run>/profiles/<set>/wells.parquet              well profiles
    <run>/evaluate/<set>/, comparison.parquet       evaluation of each feature set
    <run>/effect/effect.parquet, subsets/           treatment effect and its subsets
    <run>/sweeps/<name>/                            sweeps (raycp sweep ... --run): Tune trials, curves
    <run>/report.html, report/contents.json         the run report
    <run>/<stage>/status.json, config.yaml, ledger.parquet, ledger.json, _SUCCESS, _sites/
"""

from __future__ import annotations

from dataclasses import dataclass

from raycp.io import urls

_RENAMED = {"compress": "compressed", "extract": "features"}
"""The stages whose folder is not their name (every other stage writes to ``<run>/<stage>``)."""


def stage_folder(stage: str) -> str:
    """The folder name of a stage under the run: its name, but ``compressed`` and ``features``."""
    return _RENAMED.get(stage, stage)


@dataclass(frozen=True)
class FeatureSetLayout:
    """URLs of one feature set's outputs under ``<run>/features/<set>``."""

    folder: str
    npz_layout: str = "well/site"

    def cells(self, plate: str, well: str, site: int) -> str:
        return urls.join(self.folder, "cells", plate, f"{well}_{site}.parquet")

    def site(self, plate: str, well: str, site: int) -> str:
        return urls.join(self.folder, "sites", plate, f"{well}_{site}.parquet")

    @property
    def sites_folder(self) -> str:
        return urls.join(self.folder, "sites")

    def npz(self, plate: str, well: str, site: int) -> str:
        if self.npz_layout == "well_site":
            return urls.join(self.folder, "npz", plate, f"{well}_{site}.npz")
        return urls.join(self.folder, "npz", plate, well, f"{site}.npz")

    @property
    def sites_table(self) -> str:
        return urls.join(self.folder, "sites.parquet")

    @property
    def model_json(self) -> str:
        return urls.join(self.folder, "model.json")

    @property
    def success(self) -> str:
        return urls.join(self.folder, "_SUCCESS")


@dataclass(frozen=True)
class RunLayout:
    """Every URL under one run's output; names derive from the stage and plate/well/site only."""

    output: str

    # -- any stage
    def folder(self, stage: str) -> str:
        """``<run>/<stage folder>`` (:func:`stage_folder`)."""
        return urls.join(self.output, stage_folder(stage))

    def status(self, stage: str) -> str:
        return urls.join(self.folder(stage), "status.json")

    def success(self, stage: str) -> str:
        """The stage's ``_SUCCESS`` marker, written when every site of it is accounted for."""
        return urls.join(self.folder(stage), "_SUCCESS")

    def receipts(self, stage: str) -> str:
        """``<stage>/_sites``: one receipt a finished site, written last."""
        return urls.join(self.folder(stage), "_sites")

    def receipt(self, stage: str, plate: str, well: str, site: int) -> str:
        return urls.join(self.receipts(stage), plate, f"{well}_{site}.json")

    # -- image stages
    @property
    def index_snapshot(self) -> str:
        return urls.join(self.folder("index"), "screen.parquet")

    def png(self, plate: str, well: str, site: int, channel: str) -> str:
        return urls.join(self.folder("compress"), plate, well, str(site), f"{channel}.png")

    def nuclei(self, plate: str, well: str, site: int) -> str:
        return urls.join(self.folder("nuclei"), plate, f"{well}_{site}.parquet")

    @staticmethod
    def crops_path(plate: str, well: str, site: int) -> str:
        """A crops shard's path relative to ``<run>/crops`` (the manifest's ``path`` column)."""
        return f"{plate}/{well}_{site}.parquet"

    def crops(self, plate: str, well: str, site: int) -> str:
        return urls.join(self.folder("crops"), self.crops_path(plate, well, site))

    @property
    def deepprofiler(self) -> str:
        return urls.join(self.folder("crops"), "deepprofiler")

    # -- training
    def train_run(self, name: str) -> str:
        """The Ray Train run folder ``<run>/train/<name>`` (its ``epoch_*`` checkpoint folders)."""
        return urls.join(self.folder("train"), name)

    @property
    def model(self) -> str:
        """The exported CNN: ``<run>/train/model`` (``model.safetensors`` + ``model.json``)."""
        return urls.join(self.folder("train"), "model")

    # -- features, profiles, evaluation, effect, report
    def features(self, feature_set: str, npz_layout: str = "well/site") -> FeatureSetLayout:
        return FeatureSetLayout(urls.join(self.folder("extract"), feature_set), npz_layout)

    def profiles(self, feature_set: str) -> str:
        return urls.join(self.folder("profiles"), feature_set)

    def wells(self, feature_set: str) -> str:
        return urls.join(self.profiles(feature_set), "wells.parquet")

    def evaluation(self, feature_set: str) -> str:
        return urls.join(self.folder("evaluate"), feature_set)

    @property
    def comparison(self) -> str:
        return urls.join(self.folder("evaluate"), "comparison.parquet")

    @property
    def effect(self) -> str:
        return urls.join(self.folder("effect"), "effect.parquet")

    def effect_subset(self, name: str) -> str:
        return urls.join(self.folder("effect"), "subsets", f"{name}.parquet")

    def sweep(self, name: str) -> str:
        """A sweep's folder (``raycp sweep <name> --run``): ``<run>/sweeps/<name>``."""
        return urls.join(self.output, "sweeps", name)

    @property
    def report(self) -> str:
        return urls.join(self.output, "report.html")


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
