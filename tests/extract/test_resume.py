"""Resumable per site: a re-run does no model work on a finished folder and leaves identical bytes;
a run that died halfway (even inside a site's write) is completed by the next one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycp.extract.writers import read_cells
from tests.extract.conftest import (
    PLATE,
    RAY,
    replicated_index,
    save_index,
    tree_hashes,
    write_crops_shards,
)

CALLS_PER_SITE = 3  # 38 cells in chunks of 16


def _cfg(index_url: str, run: Path, checkpoint: Path):
    from raycp.extract.config import load_extract_config

    return load_extract_config(None, [*RAY, "model.kind=trained", f"model.path={checkpoint}",
                                      "inference.batch_size=16"], index=index_url, output=str(run))


@pytest.fixture(scope="module")
def interrupted(site_5ch, real_crops, checkpoint, ray_cluster, tmp_path_factory):
    """Four sites (crops shards of the real site under wells A01..A04). A first job got through
    A01 and A02 only, and was killed while writing A03 (its cells file is there, its median is not,
    a temp file is left over); then the job is run again on the whole index."""
    from raycp.extract.pipeline import run_extract

    root = tmp_path_factory.mktemp("resume")
    table, crops = real_crops
    index = replicated_index(site_5ch, 4)
    write_crops_shards(root / "run", index, table, crops)
    full = save_index(index, root, "sites.parquet")
    half = save_index(type(index)(index.table.iloc[:2].reset_index(drop=True), index.channels), root, "half.parquet")
    first = run_extract(_cfg(half, root / "run", checkpoint))
    folder = root / "run" / "features" / "cnn"
    shutil.copyfile(folder / "cells" / PLATE / "A01_1.parquet", folder / "cells" / PLATE / "A03_1.parquet")
    (folder / "sites" / PLATE / ".A03_1.parquet.deadbeef.tmp").write_bytes(b"partial")
    second = run_extract(_cfg(full, root / "run", checkpoint))
    return root, full, first, second


def test_rerun_after_a_kill_completes_only_the_rest(interrupted, trained_run):
    root, _, first, second = interrupted
    assert first.figures["forward_calls"] == 2 * CALLS_PER_SITE
    assert second.figures["sites_resumed"] == 2 and second.figures["sites_run"] == 2
    assert second.figures["forward_calls"] == 2 * CALLS_PER_SITE  # A03 and A04 only
    assert second.summary["processed"] == 4 and second.summary["quarantined"] == 0
    folder = root / "run" / "features" / "cnn"
    sites = pd.read_parquet(folder / "sites.parquet")
    assert sites["Metadata_Well"].tolist() == ["A01", "A02", "A03", "A04"] and (sites["Metadata_n_cells"] == 38).all()
    feats = {w: read_cells(str(folder / "cells" / PLATE / f"{w}_1.parquet")) for w in ("A01", "A03", "A04")}
    assert (feats["A03"][0]["Metadata_Well"] == "A03").all()  # the half-written site was redone
    for w in ("A03", "A04"):  # same images, same model: the same bytes of features as the first job's
        np.testing.assert_array_equal(feats[w][1], feats["A01"][1])
    # crops from the crops stage's shards == crops made from the images in the same pass
    run, _ = trained_run
    _, from_images, _ = read_cells(str(run / "features" / "cnn" / "cells" / PLATE / "C03_3.parquet"))
    np.testing.assert_array_equal(feats["A01"][1], from_images)


def test_rerun_on_a_finished_folder_does_no_model_work_and_keeps_every_byte(interrupted, checkpoint):
    from raycp.extract.pipeline import run_extract

    root, full, _, _ = interrupted
    folder = root / "run" / "features"
    before = tree_hashes(folder)
    again = run_extract(_cfg(full, root / "run", checkpoint))
    assert again.figures["forward_calls"] == 0 and again.figures["sites_run"] == 0
    assert again.figures["sites_resumed"] == 4 and again.summary["processed"] == 4 and again.figures["cells"] == 4 * 38
    after = tree_hashes(folder)
    assert after == before  # ledger, medians, cells, model.json, config.yaml, _SUCCESS: same bytes


@pytest.mark.slow
def test_a_killed_process_is_completed_by_the_next_run(site_5ch, real_crops, checkpoint, ray_cluster, tmp_path):
    """The real thing: SIGKILL the `raycp extract` process (and its Ray) after its first site."""
    from raycp.extract.pipeline import run_extract

    table, crops = real_crops
    index = replicated_index(site_5ch, 6)
    write_crops_shards(tmp_path / "run", index, table, crops)
    url = save_index(index, tmp_path)
    sets = [*RAY, "model.kind=trained", f"model.path={checkpoint}", "inference.batch_size=16",
            f"data.index={url}", f"data.output={tmp_path / 'run'}"]
    code = f"from raycp.extract import extract; extract(None, {sets!r})"
    ray_tmp = tempfile.mkdtemp(prefix="rk")  # short: Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAYCP_RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(Path(__file__).parents[2])}
    log = open(tmp_path / "job.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True, stdout=log, stderr=log)
    medians = tmp_path / "run" / "features" / "cnn" / "sites" / PLATE
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if medians.exists() and len(list(medians.glob("*.parquet"))) >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "job.log").read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    log.close()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    done = len(list(medians.glob("*.parquet")))
    assert 1 <= done < 6
    result = run_extract(_cfg(url, tmp_path / "run", checkpoint))
    assert result.figures["sites_resumed"] == done and result.summary["processed"] == 6
    assert result.figures["forward_calls"] == (6 - done) * CALLS_PER_SITE
