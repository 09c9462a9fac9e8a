"""Confounders: plate, illumination, well position, focus and camera, each reproducible from the seed."""

from __future__ import annotations

import numpy as np
import pytest

from raycp.screens import confounders as conf
from raycp.screens.config import ConfounderConfig


def test_named_streams_are_reproducible_and_independent():
    a = conf.rng_for(7, conf.STREAM_SITE, 0, 1, 2, 3).random(4)
    assert np.array_equal(a, conf.rng_for(7, conf.STREAM_SITE, 0, 1, 2, 3).random(4))
    assert not np.array_equal(a, conf.rng_for(7, conf.STREAM_SITE, 0, 1, 2, 4).random(4))
    assert not np.array_equal(a, conf.rng_for(8, conf.STREAM_SITE, 0, 1, 2, 3).random(4))


def test_plates_differ_in_gain_offset_and_illumination():
    cfg = ConfounderConfig()
    p0, p1 = (conf.draw_plate(0, i, f"P{i}", 5, cfg) for i in range(2))
    assert p0 == conf.draw_plate(0, 0, "P0", 5, cfg)
    assert np.abs(np.log(p0.gain) - np.log(p1.gain)).max() > 0.1
    gains = np.log([conf.draw_plate(0, i, "P", 5, cfg).gain for i in range(200)])
    assert gains.std() == pytest.approx(cfg.plate_gain_sd, rel=0.1)
    off = conf.draw_plate(0, 0, "P", 5, ConfounderConfig(plate_gain_sd=0, plate_offset_sd=0))
    assert off.gain == (1.0,) * 5 and off.offset == (0.0,) * 5


def test_illumination_field_is_vignetting_brightest_near_the_axis():
    f = conf.illumination_field((0.0, 0.0, 0.3, 0.0, 0.0), (101, 101))
    assert f[50, 50] == pytest.approx(1.0) and f[0, 0] == pytest.approx(1 - 0.3 * 2 / 2)
    tilted = conf.illumination_field((0.0, 0.0, 0.0, 0.1, 0.0), (101, 101))
    assert tilted[-1, 50] > tilted[0, 50]


def test_well_position_marks_the_outer_rings():
    assert conf.well_edge(0, 5, 8, 12) == 1.0 and conf.well_edge(7, 11, 8, 12) == 1.0
    assert conf.well_edge(1, 5, 8, 12) == 0.5 and conf.well_edge(3, 5, 8, 12) == 0.0


def test_focus_blur_is_gamma_distributed_around_its_mean():
    rng = np.random.default_rng(0)
    s = np.array([conf.site_focus(rng, 0.5) for _ in range(5000)])
    assert s.mean() == pytest.approx(0.5, rel=0.05) and (s > 0).all()
    assert conf.site_focus(rng, 0.0) == 0.0
    img = np.zeros((1, 21, 21), np.float32)
    img[0, 10, 10] = 100
    assert conf.blur(img, 1.5)[0, 10, 10] < 10 and conf.blur(img, 1.5).sum() == pytest.approx(100, rel=1e-3)


def test_camera_adds_shot_noise_and_clips_to_12_bits():
    rng = np.random.default_rng(0)
    flat = np.full((1, 200, 200), 1000.0, np.float32)
    out = conf.camera(flat, rng, adu_per_electron=0.5, read_noise=1.5, bit_depth=12)
    assert out.dtype == np.uint16
    assert out.std() == pytest.approx(np.sqrt(1000 * 0.5 + 1.5 ** 2), rel=0.05)
    hot = conf.camera(np.full((1, 10, 10), 9000.0, np.float32), rng, adu_per_electron=0.5, read_noise=1.5,
                      bit_depth=12)
    assert hot.max() == 4095


def test_every_confounder_is_documented_with_why_and_paper_section():
    items = conf.describe(ConfounderConfig())
    assert {c["name"] for c in items} == {"plate_gain_offset", "illumination_field", "well_position",
                                          "plate_density", "focus", "camera"}
    for c in items:
        assert c["what"] and c["why"] and ("Fig. 1B" in c["paper"] or "Methods" in c["paper"])
