"""Bad input: one-line errors before any work for a bad model or config; a bad site is quarantined
with its reason while the others are profiled; nothing already written is lost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from raycp.errors import ConfigError, InputError
from tests.extract.conftest import CHANNELS, RAY, make_checkpoint, real_index, save_index, tree_hashes


def _cfg(index_url: str, run: Path, *sets: str):
    from raycp.extract.config import load_extract_config

    return load_extract_config(None, [*RAY, "illumination.enabled=false", *sets], index=index_url, output=str(run))


@pytest.fixture
def finished(tmp_path, site_5ch):
    """A run folder that already holds a model's features (a file that must survive any error)."""
    index_url = save_index(real_index(site_5ch), tmp_path)
    old = tmp_path / "run" / "features" / "cnn" / "sites" / "P" / "A01_1.parquet"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"earlier results")
    return index_url, tmp_path / "run"


def test_checkpoint_with_another_number_of_input_channels_fails_before_any_work(finished, tmp_path):
    from raycp.extract.pipeline import run_extract

    index_url, run = finished
    three = make_checkpoint(tmp_path / "three", in_chans=3, channels=["DNA", "RNA", "AGP"])
    before = tree_hashes(run)
    with pytest.raises(InputError) as err:
        run_extract(_cfg(index_url, run, "model.kind=trained", f"model.path={three}"))
    assert "takes 3 input channels" in err.value.one_line() and "data.channels" in err.value.one_line()
    assert tree_hashes(run) == before  # nothing written, nothing lost


def test_unknown_feature_layer_fails_before_any_work(finished, checkpoint):
    from raycp.extract.pipeline import run_extract

    index_url, run = finished
    before = tree_hashes(run)
    with pytest.raises(InputError, match="feature layer 'block8a_activation'"):
        run_extract(_cfg(index_url, run, "model.kind=trained", f"model.path={checkpoint}",
                         "model.layer=block8a_activation"))
    assert tree_hashes(run) == before


def test_a_folder_made_by_another_model_is_not_resumed_into(site_5ch, checkpoint, tmp_path):
    from raycp.extract.pipeline import plan

    index_url = save_index(real_index(site_5ch), tmp_path)
    plan(_cfg(index_url, tmp_path / "run", "model.kind=trained", f"model.path={checkpoint}", "input=images"))
    other = make_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(InputError, match="holds features of another model.*set model.name"):
        plan(_cfg(index_url, tmp_path / "run", "model.kind=trained", f"model.path={other}", "input=images"))


def test_config_mistakes_are_one_line():
    from raycp.extract.config import load_extract_config

    with pytest.raises(ConfigError, match="unknown key 'model.weights'"):
        load_extract_config(None, ["model.weights=x"], index="i", output="o")
    with pytest.raises(ConfigError, match="model.path"):
        load_extract_config(None, ["model.kind=imagenet"], index="i", output="o")


def test_illumination_on_without_its_stage_is_named(site_5ch, checkpoint, tmp_path):
    from raycp.extract.pipeline import plan

    index_url = save_index(real_index(site_5ch), tmp_path)
    with pytest.raises(InputError, match="illum/_SUCCESS missing.*illumination.enabled=false"):
        plan(_cfg(index_url, tmp_path / "run", "model.kind=trained", f"model.path={checkpoint}", "input=images",
                  "illumination.enabled=true"))


def test_bad_sites_are_quarantined_and_the_good_one_profiled_on_s3(site_5ch, checkpoint, s3_server, ray_cluster,
                                                                   tmp_path, capsys):
    """Images and outputs on S3 (moto): a site with a missing channel file and an empty site (no
    nucleus) beside the real one, through the CLI."""
    import io

    from raycp import cli
    from raycp.extract import cli as extract_cli
    from raycp.io.index import validate

    fs, bucket = s3_server["fs"], s3_server["bucket"]
    good = real_index(site_5ch).table.iloc[0].to_dict()
    for ch in CHANNELS:  # the real site's images, uploaded
        remote = f"{bucket}/extract-bad/images/{Path(good[f'URL_{ch}']).name}"
        fs.put_file(good[f"URL_{ch}"], remote)
        good[f"URL_{ch}"] = f"s3://{remote}"
    missing = {**good, "Metadata_Well": "A02", "URL_Mito": f"s3://{bucket}/extract-bad/gone/mito.tiff"}
    blank = {**good, "Metadata_Well": "A03"}
    flat = np.full((1080, 1080), 120, dtype=np.uint16)  # an empty field: background only
    for ch in CHANNELS:
        path = tmp_path / "blank" / f"{ch}.tiff"
        path.parent.mkdir(exist_ok=True)
        tifffile.imwrite(path, flat)
        blank[f"URL_{ch}"] = str(path)
    index_url = save_index(validate(pd.DataFrame([good, missing, blank]), CHANNELS), tmp_path)
    run = f"s3://{bucket}/extract-bad/run"
    if not any(g.name == "extract" for g in cli.app.registered_groups):
        cli.app.add_typer(extract_cli.app, name="extract")
    code = cli.main(["extract", "--index", index_url, "--output", run, "--model", "trained",
                     "--weights", str(checkpoint), "--set", "illumination.enabled=false", "--set", "input=images",
                     *[a for s in RAY for a in ("--set", s)]])
    out = capsys.readouterr().out
    assert code == 3, out  # done, with quarantined sites
    folder = f"{bucket}/extract-bad/run/features/cnn"
    ledger = pd.read_parquet(io.BytesIO(fs.cat_file(f"{folder}/ledger.parquet"))).set_index("Metadata_Well")
    assert ledger.loc["C03", "status"] == "processed" and ledger.loc["C03", "n_cells"] == 38
    assert ledger.loc["A02", "status"] == "quarantined"
    assert f"s3://{bucket}/extract-bad/gone/mito.tiff: file not found" in ledger.loc["A02", "reason"]
    assert ledger.loc["A03", "status"] == "quarantined" and "empty site, zero nuclei" in ledger.loc["A03", "reason"]
    assert "3 input(s) = 1 processed + 2 quarantined" in out
    sites = pd.read_parquet(io.BytesIO(fs.cat_file(f"{folder}/sites.parquet")))
    assert sites["Metadata_Well"].tolist() == ["C03"]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{folder}/cells")) == ["C03_3.parquet"]


def test_cuda_on_a_local_cluster_without_gpus_is_one_line(finished, checkpoint, ray_cluster):
    """A local cluster raycp started never grows: asking for CUDA there is an error before any work
    (on a cluster raycp joined, the actors wait for its autoscaler to add a GPU node instead)."""
    from raycp.extract.pipeline import run_extract

    index_url, run = finished
    with pytest.raises(InputError, match="inference.device=cuda but the Ray cluster has no GPU"):
        run_extract(_cfg(index_url, run, "model.kind=trained", f"model.path={checkpoint}", "inference.device=cuda"))
    sites = sorted((run / "features" / "cnn" / "sites").rglob("*.parquet"))
    assert [p.read_bytes() for p in sites] == [b"earlier results"]      # no site profiled, none lost
