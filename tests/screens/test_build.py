"""`raycp screen build`: a labelled screen of real cells with the structure the paper's problem has."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from raycp.errors import InputError
from raycp.io.index import IS_CONTROL, PLATE, SITE, TREATMENT, WELL, read_index
from raycp.screens import programs as prog
from raycp.screens.build import NUCLEUS_X, NUCLEUS_Y, build_screen, compose_site, plan_screen
from raycp.screens.stats import detection_f1, structure_report

from .conftest import TINY, screen_config

KEY = [PLATE, WELL, SITE]


def test_a_site_depends_only_on_the_seed_and_its_position(library, source_folder):
    """Pure numpy, no cluster: the same spec gives the same pixels on any worker, in any batch."""
    cfg = screen_config(source_folder)
    plan = plan_screen(cfg)
    specs = plan.sites.to_dict("records")
    a = compose_site(specs[0], library, plan.plates[specs[0][PLATE]], cfg)
    b = compose_site(specs[0], library, plan.plates[specs[0][PLATE]], cfg)
    c = compose_site(specs[1], library, plan.plates[specs[1][PLATE]], cfg)
    assert np.array_equal(a.image, b.image) and a.nuclei == b.nuclei
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (5, 320, 320) and a.image.dtype == np.uint16 and a.image.max() <= 4095
    xy = np.array([[n[NUCLEUS_X], n[NUCLEUS_Y]] for n in a.nuclei])
    assert 10 <= len(xy) <= 35 and (xy >= 0).all() and (xy < 320).all()


def test_mini_preset_writes_a_valid_two_plate_screen(mini_screen):
    index = read_index(os.path.join(mini_screen.output, "index", "sites.parquet"), check_files=True)
    t = index.table
    assert index.channels == ("DNA", "ER", "RNA", "AGP", "Mito")
    assert index.plates() == ["SCR01", "SCR02"] and len(t) == 228
    assert {"Metadata_MoA", "Metadata_Strength", "Metadata_StrengthClass"} <= set(t.columns)
    assert (t.groupby([PLATE, WELL]).size() == 3).all()
    assert t[t[IS_CONTROL]].groupby(PLATE)[WELL].nunique().to_dict() == {"SCR01": 8, "SCR02": 8}
    wells = t[~t[IS_CONTROL]].drop_duplicates([PLATE, WELL]).groupby(TREATMENT)[PLATE].agg(["size", "nunique"])
    assert len(wells) == 12 and (wells["size"] == 5).all() and (wells["nunique"] == 2).all()
    assert t.loc[~t[IS_CONTROL], "Metadata_MoA"].str.contains("|", regex=False).any()
    img = tifffile.imread(t["URL_Mito"].iloc[0])
    assert img.shape == (320, 320) and img.dtype == np.uint16 and 0 < img.max() <= 4095
    truth = pd.read_parquet(Path(mini_screen.output) / "truth" / "treatments.parquet")
    assert set(truth.columns) >= {TREATMENT, "Metadata_MoA", "Metadata_Strength", "Metadata_StrengthClass",
                                  "Metadata_RespondingFraction", "n_wells"}
    nuclei = pd.read_parquet(Path(mini_screen.output) / "truth" / "nuclei.parquet")
    per_site = nuclei.groupby(KEY).size()
    assert len(per_site) == 228 and 12 <= per_site.median() <= 30
    assert not nuclei.merge(t[t[IS_CONTROL]][KEY], on=KEY)["responder"].any()
    # heterogeneous response: the share of responding cells follows each treatment's responding fraction
    share = nuclei.merge(t[KEY + [TREATMENT]], on=KEY).groupby(TREATMENT)["responder"].mean()
    active = truth[truth["Metadata_Strength"] > 0].set_index(TREATMENT)["Metadata_RespondingFraction"]
    assert (share[active.index] - active).abs().max() < 0.12
    assert (Path(mini_screen.output) / "_SUCCESS").exists()


def test_mini_preset_builds_in_under_a_minute_on_two_cpus(mini_screen):
    """The site work (compose + write, summed over Ray tasks) fits 2 CPUs × 45 s, leaving time for
    Ray to start; the wall clock is checked too unless other jobs load this shared machine."""
    assert mini_screen.task_cpu_seconds < 2 * 45
    load = os.getloadavg()[0]
    if load > 2 * (os.cpu_count() or 1):
        pytest.skip(f"machine shared and loaded (1-min load {load:.1f}): build took {mini_screen.seconds:.1f} s")
    assert mini_screen.seconds < 60


def test_plate_dominates_raw_features_and_control_normalisation_recovers_strength(mini_screen, mini_features):
    """Simple per-site statistics (no CNN): confounders make the plate predictable from controls alone;
    after per-plate control normalisation the paper's effect estimate ranks strong above null."""
    truth = mini_screen.treatments
    raw, stretched = mini_features
    report = structure_report(raw, truth)
    assert report["plate_accuracy_raw"] >= 0.9 > report["chance"] + 0.3
    assert report["plate_accuracy_normalised"] < report["plate_accuracy_raw"] - 0.2
    e = report["effect_by_class"]
    assert e["strong"]["min"] > e["null"]["max"] + 1.0
    assert e["strong"]["mean"] > e["median"]["mean"] > e["weak"]["mean"] > e["null"]["mean"]
    assert report["spearman_strength_effect"] > 0.7
    # the paper's per-image 8-bit stretch hides plate gains, yet plate stays visible (offsets, focus,
    # density): what lets a CNN do better leaving cells out than leaving plates out (paper Fig. 2)
    assert structure_report(stretched, truth)["plate_accuracy_raw"] >= 0.65


def test_nuclei_detection_finds_the_true_centres(mini_screen):
    """The images stage's detector (raycp.preprocess.nuclei) on the DNA channel of site 1 of every
    well (76 sites, ~1,500 nuclei): F1 ≥ 0.95 within 8 px (a third of a nucleus diameter)."""
    nuclei_mod = pytest.importorskip("raycp.preprocess.nuclei", reason="issue 4's nuclei detector not present")
    truth = pd.read_parquet(Path(mini_screen.output) / "truth" / "nuclei.parquet")
    groups = truth.groupby(KEY)
    tp = n_pred = n_true = 0
    sites = mini_screen.index.table
    for row in sites[sites[SITE] == 1].itertuples(index=False):
        found = nuclei_mod.detect_nuclei(tifffile.imread(row.URL_DNA))
        key = (row.Metadata_Plate, row.Metadata_Well, row.Metadata_Site)
        ref = groups.get_group(key)[[NUCLEUS_X, NUCLEUS_Y]].to_numpy() if key in groups.groups else np.zeros((0, 2))
        m = nuclei_mod.match_centres(found[[nuclei_mod.X, nuclei_mod.Y]].to_numpy(), ref, tolerance=8.0)
        tp, n_pred, n_true = tp + m["tp"], n_pred + m["predicted"], n_true + m["reference"]
    f1 = 2 * tp / (n_pred + n_true)
    assert n_true > 1000 and f1 >= 0.95


def test_detection_f1_counts_one_to_one_matches():
    true = np.array([[10, 10], [50, 50], [90, 90]])
    assert detection_f1(true + 1, true, 3)[0] == 1.0
    assert detection_f1(np.array([[10, 10], [11, 11]]), true, 3)[:2] == (pytest.approx(2 / 5), 1)


def test_manifest_and_readme_explain_every_program_and_confounder(mini_screen):
    manifest = json.loads((Path(mini_screen.output) / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(mini_screen.manifest))
    programs = manifest["treatments"]["programs"]
    assert set(programs) == {"nuclear_enlargement", "mitochondrial_stress", "er_stress", "actin_remodeling"}
    for p in programs.values():
        assert p["what"] and p["why"] and "Methods" in p["paper"] and p["params_at_strength_1"]
    names = {c["name"] for c in manifest["confounders"]["list"]}
    assert len(manifest["confounders"]["per_plate"]) == 2 and len(names) == 6
    assert manifest["cells"]["n_cells"] >= 25 and "5-channel" in manifest["cells"]["rule"]
    readme = (Path(__file__).parents[2] / "README.md").read_text()  # the screen builder section
    for name in [*prog.MOAS, "plate gain/offset", "illumination field", "well position", "plate density",
                 "focus", "camera", "Fill rule"]:
        assert name in readme, name


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rebuilding_gives_identical_bytes(source_folder, ray_cluster, tmp_path):
    cfg = screen_config(source_folder, extra=TINY)
    out = tmp_path / "tiny"
    build_screen(cfg, str(out))
    first = _hashes(out)
    build_screen(cfg, str(out))
    assert _hashes(out) == first and any(k.endswith(".tiff") for k in first)
    build_screen(cfg, str(tmp_path / "local"), engine="local")  # in-process: the same pixels and truth
    local = _hashes(tmp_path / "local")
    for name in [k for k in first if k.endswith(".tiff")] + ["truth/nuclei.parquet", "truth/treatments.parquet"]:
        assert local[name] == first[name], name
    build_screen(screen_config(source_folder, extra=[*TINY, "seed=1"]), str(tmp_path / "seed1"))
    other = _hashes(tmp_path / "seed1")
    tiffs = [k for k in first if k.endswith(".tiff")]
    assert all(other.get(k) != first[k] for k in tiffs)


@pytest.mark.s3
def test_a_screen_can_be_written_to_an_object_store(source_folder, ray_cluster, s3_server):
    url = f"s3://{s3_server['bucket']}/screens/tiny"
    result = build_screen(screen_config(source_folder, extra=TINY), url)
    index = read_index(f"{url}/index/sites.parquet", check_files=True)
    assert len(index) == len(result.index) and index.table["URL_DNA"].str.startswith("s3://").all()
    from raycp.io.images import read_image

    assert read_image(index.table["URL_DNA"].iloc[0]).dtype == np.uint16
    assert s3_server["fs"].exists(f"{s3_server['bucket']}/screens/tiny/manifest.json")


def test_a_plate_map_with_more_treatments_than_wells_fails_before_writing(source_folder, tmp_path):
    cfg = screen_config(source_folder, extra=["treatments.n=40"])
    with pytest.raises(InputError, match=r"needs 108 wells on a plate .* a 96-well plate has 96 \(fix:"):
        build_screen(cfg, str(tmp_path / "out"), engine="local")
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_url_is_a_clear_error(source_folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match=r"a_file/screen: output location is not writable .*\(fix: choose"):
        build_screen(screen_config(source_folder, extra=TINY), str(blocker / "screen"), engine="local")


def test_a_source_without_usable_cells_is_a_clear_error(shared_data, tmp_path):
    cfg = screen_config(str(shared_data / "images" / "nf1_3ch_plate2"), extra=TINY)
    with pytest.raises(InputError, match=r"nf1_3ch_plate2: no usable cells: no 5-channel site .*\(fix:"):
        build_screen(cfg, str(tmp_path / "out"), engine="local")
