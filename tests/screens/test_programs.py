"""Each treatment program changes the real cells the documented way, graded by strength."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from raycp.errors import ConfigError
from raycp.screens import programs as prog

CH = ("DNA", "ER", "RNA", "AGP", "Mito")
DNA, ER, RNA, AGP, MITO = range(5)


def run(library, moa, strength, n=12, seed=0):
    rng = np.random.default_rng(seed)
    cells = library.cells[:n]
    return cells, [prog.PROGRAMS[moa].apply(c, strength, rng, CH) for c in cells]


def ratio(before, after, measure):
    return float(np.median([measure(a) / measure(b) for b, a in zip(before, after)]))


def test_strength_zero_is_the_identity_for_every_program(library):
    for moa in prog.MOAS:
        cells, out = run(library, moa, 0.0, n=3)
        for c, o in zip(cells, out):
            assert o is c


def test_nuclear_enlargement_grows_the_nucleus_area_by_scale_squared(library):
    scale = prog.PROGRAMS["nuclear_enlargement"].params["scale"]
    cells, full = run(library, "nuclear_enlargement", 1.0)
    _, half = run(library, "nuclear_enlargement", 0.5)
    area = lambda c: c.nucleus.sum()  # noqa: E731
    assert ratio(cells, full, area) == pytest.approx(scale ** 2, rel=0.1)
    assert 1.1 < ratio(cells, half, area) < ratio(cells, full, area)
    for c, o in zip(cells, full):  # DNA only: the other channels keep their real pixel values
        for ch in (ER, RNA, AGP, MITO):
            assert set(o.signal[ch][o.signal[ch] != 0].tolist()) <= set(c.signal[ch].ravel().tolist())


def test_mitochondrial_stress_raises_mito_intensity_and_texture_only(library):
    cells, out = run(library, "mitochondrial_stress", 1.0)
    p = prog.PROGRAMS["mitochondrial_stress"].params
    mean = lambda c: c.signal[MITO][c.cell].mean()  # noqa: E731
    texture = lambda c: np.abs(c.signal[MITO] - ndi.gaussian_filter(c.signal[MITO], 1.5))[c.cell].mean()  # noqa: E731
    assert ratio(cells, out, mean) == pytest.approx(1 + p["gain"], rel=0.15)
    assert ratio(cells, out, texture) > ratio(cells, out, mean) + 0.5
    for c, o in zip(cells, out):
        assert np.array_equal(np.delete(o.signal, MITO, 0), np.delete(c.signal, MITO, 0))


def test_er_stress_moves_the_er_signal_away_from_the_nucleus(library):
    def spread(c):
        yy, xx = np.indices(c.cell.shape)
        cy, cx = c.nucleus_centre
        w = np.clip(c.signal[ER], 0, None) * c.cell
        return float((w * np.hypot(yy - cy, xx - cx)).sum() / w.sum())

    cells, out = run(library, "er_stress", 1.0)
    _, weak = run(library, "er_stress", 0.2)
    assert ratio(cells, out, spread) > 1.15
    assert 1.0 < ratio(cells, weak, spread) < ratio(cells, out, spread)


def test_actin_remodeling_elongates_cells(library):
    from skimage.measure import regionprops

    def ecc(c):
        props = regionprops(c.cell.astype(np.uint8))[0]
        return props.axis_major_length / props.axis_minor_length

    cells, out = run(library, "actin_remodeling", 1.0)
    assert ratio(cells, out, ecc) > 1.3
    agp = lambda c: c.signal[AGP][c.cell].mean()  # noqa: E731
    assert ratio(cells, out, agp) > 1.2


def test_rna_granules_amplify_the_real_rna_spots(library):
    granularity = lambda c: ndi.white_tophat(c.signal[RNA], size=5)[c.cell].sum()  # noqa: E731
    cells, out = run(library, "rna_granules", 1.0)
    assert ratio(cells, out, granularity) > 4.0
    for c, o in zip(cells, out):
        assert np.array_equal(np.delete(o.signal, RNA, 0), np.delete(c.signal, RNA, 0))


def test_cytotoxic_condenses_survivors_and_loses_responders(library):
    cells, out = run(library, "cytotoxic", 1.0)
    assert ratio(cells, out, lambda c: c.nucleus.sum()) < 0.7
    assert ratio(cells, out, lambda c: c.signal[DNA][c.nucleus].mean()) > 1.4
    assert prog.loss_probability(["cytotoxic"], 1.0) == pytest.approx(0.7)
    assert prog.loss_probability(["er_stress"], 1.0) == 0.0


def test_every_program_is_documented_with_its_paper_section():
    for moa, p in prog.PROGRAMS.items():
        d = p.describe()
        assert d["moa"] == moa and d["what"] and d["why"] and "Methods" in d["paper"]


def test_heterogeneity_spreads_cell_strength_around_the_treatment():
    rng = np.random.default_rng(1)
    s = np.array([prog.cell_strength(0.5, rng) for _ in range(4000)])
    assert np.median(s) == pytest.approx(0.5, rel=0.05)
    assert np.std(np.log(s)) == pytest.approx(prog.CELL_STRENGTH_SIGMA, rel=0.1)
    assert prog.cell_strength(0.0, rng) == 0.0


def test_unknown_moa_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown MoA program.*fix: choose from"):
        prog.check_moas(["nuclear_enlargement", "telekinesis"])
