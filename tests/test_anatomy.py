"""Anatomy with known geometry: AHA segment ranges, radial depth, layers, transmurality, captions,
parametric scar masks, edge maps and slice levels."""

import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from engine.anatomy import aha_segments, radial_depth, radial_layers, slice_levels, wall_share_depth
from engine.anatomy.aha import TERRITORIES
from engine.anatomy.captions import CONSTANT_CAPTION, caption
from engine.anatomy.masks import (
    ScarSamplerConfig,
    ScarSpec,
    apply_scar,
    draw_scar_spec,
    edge_map,
    ellipsoid_scar_mask,
    sample_scar,
)
from engine.anatomy.transmurality import describe_scar, segment_transmurality, transmurality_class

SIZE, CENTRE, R_IN, R_OUT = 129, 64.0, 18.0, 30.0

# DOMAIN.md section 2, written out independently of the implementation: (segment, lo, hi) degrees
# at reference angle 120, counter-clockwise from +x.
TABLE = {
    "basal": [(1, 60, 120), (2, 120, 180), (3, 180, 240), (4, 240, 300), (5, 300, 360), (6, 0, 60)],
    "mid": [(7, 60, 120), (8, 120, 180), (9, 180, 240), (10, 240, 300), (11, 300, 360), (12, 0, 60)],
    "apical": [(13, 45, 135), (14, 135, 225), (15, 225, 315), (16, 315, 405)],
}


def ring(r_in=R_IN, r_out=R_OUT, size=SIZE, centre=CENTRE):
    rows, cols = np.mgrid[:size, :size]
    r = np.hypot(rows - centre, cols - centre)
    label = np.zeros((size, size), np.uint8)
    label[r <= r_out] = 2
    label[r < r_in] = 1
    # "up" is decreasing row index
    angle = np.degrees(np.arctan2(-(rows - centre), cols - centre)) % 360
    return label, angle, r


def expected_segment(angle, level, reference):
    a = (angle - (reference - 120)) % 360
    for seg, lo, hi in TABLE[level]:
        if lo <= a < hi or lo <= a + 360 < hi:
            return seg
    raise AssertionError(a)


@pytest.mark.parametrize("level", ["basal", "mid", "apical"])
@pytest.mark.parametrize("reference", [120.0, 100.0, 137.5, 300.0])
def test_ring_segments_follow_the_table(level, reference):
    label, angle, _ = ring()
    seg = aha_segments(label, level, reference)
    myo = label == 2
    assert (seg[~myo] == 0).all()
    # pixels away from a boundary (angular rounding) must land in the table's range exactly
    boundaries = np.array([lo for _, lo, _ in TABLE[level]]) + (reference - 120)
    gap = np.abs((angle[..., None] - boundaries + 180) % 360 - 180).min(-1)
    check = myo & (gap > 1e-6)
    want = np.vectorize(lambda a: expected_segment(a, level, reference))(angle[check])
    np.testing.assert_array_equal(seg[check], want)
    assert set(np.unique(seg[myo])) == {s for s, _, _ in TABLE[level]}


@pytest.mark.parametrize(
    "row, col, level, segment",
    [  # points on the ring's mid-line at named directions, reference 120
        (64 - 24, 64, "mid", 7),  # straight up: anterior
        (64 + 24, 64, "mid", 10),  # straight down: inferior
        (64 - 12, 64 - 21, "mid", 8),  # up-left (~150 deg): anteroseptal, RV side
        (64 + 12, 64 - 21, "mid", 9),  # down-left (~210): inferoseptal
        (64 + 12, 64 + 21, "basal", 5),  # down-right (~330): inferolateral
        (64 - 12, 64 + 21, "basal", 6),  # up-right (~30): anterolateral
        (64, 64 - 24, "apical", 14),  # left: septal
        (64, 64 + 24, "apical", 16),  # right: lateral
    ],
)
def test_named_directions(row, col, level, segment):
    label, _, _ = ring()
    assert aha_segments(label, level)[row, col] == segment


def test_segments_follow_the_lv_centre_not_the_image_centre():
    label, _, _ = ring(centre=40.0, size=160)
    seg = aha_segments(label, "mid")
    assert seg[40 - 24, 40] == 7 and seg[40 + 24, 40] == 10


def test_unknown_level_and_bad_shape_raise():
    label, _, _ = ring()
    with pytest.raises(ValueError, match="level"):
        aha_segments(label, "middle")
    with pytest.raises(ValueError, match="2D"):
        aha_segments(label[None], "mid")


def test_depth_is_zero_at_the_cavity_border_and_one_at_the_outer_border():
    label, _, r = ring()
    depth = radial_depth(label)
    myo = label == 2
    assert np.isnan(depth[~myo]).all() and not np.isnan(depth[myo]).any()
    cavity = label == 1
    outside = label == 0
    from scipy import ndimage

    touches_cavity = myo & ndimage.binary_dilation(cavity, np.ones((3, 3), bool))
    touches_outside = myo & ndimage.binary_dilation(outside, np.ones((3, 3), bool))
    assert np.allclose(depth[touches_cavity & ~touches_outside], 0.0)
    assert np.allclose(depth[touches_outside & ~touches_cavity], 1.0)
    # and grows monotonically with radius along the wall (to within a pixel's rounding)
    mid = myo & (np.abs(r - (R_IN + R_OUT) / 2) < 0.5)
    assert np.all(np.abs(depth[mid] - 0.5) < 0.12)
    inner, outer = myo & (r < R_IN + 3), myo & (r > R_OUT - 3)
    assert depth[inner].max() < depth[outer].min()


def test_layers_split_the_wall_in_thirds():
    label, _, _ = ring()
    depth = radial_depth(label)
    layers = radial_layers(depth)
    assert (layers[label != 2] == 0).all()
    for layer, lo, hi in [(1, 0, 1 / 3), (2, 1 / 3, 2 / 3), (3, 2 / 3, 1.01)]:
        d = depth[layers == layer]
        assert d.size > 0 and d.min() >= lo and d.max() < hi


def test_depth_without_cavity_is_undefined():
    label, _, _ = ring()
    label[label == 1] = 2
    assert np.isnan(radial_depth(label)).all()


@pytest.mark.parametrize(
    "fraction, name",
    [(0.0, "0%"), (0.01, "1-25%"), (0.25, "1-25%"), (0.26, "26-50%"), (0.5, "26-50%"),
     (0.51, "51-75%"), (0.75, "51-75%"), (0.76, "76-100%"), (1.0, "76-100%")],
)
def test_transmurality_scale(fraction, name):
    assert transmurality_class(fraction) == name


def test_transmurality_class_rejects_out_of_range():
    with pytest.raises(ValueError):
        transmurality_class(1.5)


def wedge(label, angle, r, lo, hi, r_max, value=3):
    out = label.copy()
    out[(label == 2) & (angle >= lo) & (angle < hi) & (r <= r_max)] = value
    return out


@pytest.mark.parametrize(
    "lo, hi, r_max, segments, klass, layer",
    [  # ring wall from r=18 to r=30 (13 pixel rows)
        (250, 350, 21.5, (10, 11), "26-50%", "subendocardial"),  # ~4/13 of the wall
        (250, 290, 24.5, (10,), "51-75%", "subendocardial"),
        (70, 110, 31, (7,), "76-100%", "transmural"),
        (125, 175, 18.5, (8,), "1-25%", "subendocardial"),
    ],
)
def test_transmurality_and_caption_of_known_wedges(lo, hi, r_max, segments, klass, layer):
    label, angle, r = ring()
    scarred = wedge(label, angle, r, lo, hi, r_max)
    anatomy = describe_scar(scarred, "mid")
    assert anatomy.segments == segments
    assert anatomy.transmurality_class == klass
    assert anatomy.layer == layer
    assert set(segment_transmurality(scarred, "mid")) == set(segments)
    text = caption(scarred, "mid")
    names = {7: "mid anterior", 8: "mid anteroseptal", 10: "mid inferior", 11: "mid inferolateral"}
    for s in segments:
        assert names[s] in text
    assert klass in text and (layer in text or layer == "transmural")
    assert text.startswith("LGE short-axis, mid slice.")


@pytest.mark.parametrize("reference", [120.0, 100.0, 137.5])
@pytest.mark.parametrize(
    "lo, hi, segments",
    [  # transmural scar at the apical boundaries (45 + 90k at reference 120), where rays used to
        # straddle two segments and a segment with scar only there crashed describe_scar
        (100, 136, (13,)),  # one degree into septal: too little to name, but measured
        (100, 135.5, (13,)),
        (135, 136, (14,)),  # one-degree slivers just past a boundary
        (313, 315, (15,)),
        (315, 316, (16,)),
        (280, 315.7, (15,)),
    ],
)
def test_apical_scar_at_a_segment_boundary(lo, hi, segments, reference):
    label, angle, r = ring()
    scarred = wedge(label, (angle - (reference - 120)) % 360, r, lo, hi, R_OUT + 1)
    anatomy = describe_scar(scarred, "apical", reference)
    assert anatomy.segments == segments
    holding = set(np.unique(aha_segments(scarred, "apical", reference)[scarred == 3]))
    assert set(anatomy.segment_extent) == holding and all(0 < v <= 1 for v in anatomy.segment_extent.values())


@pytest.mark.parametrize("reference", [120.0, 100.0, 137.5])
def test_a_segment_extent_uses_only_its_own_pixels(reference):
    # transmural in apical anterior right up to the septal border, a thin band in septal beyond it:
    # the ray across the border must not lend septal the anterior scar's extent
    label, angle, r = ring()
    rotated = (angle - (reference - 120)) % 360
    scarred = wedge(label, rotated, r, 95, 135, R_OUT + 1)
    scarred = wedge(scarred, rotated, r, 135, 180, R_IN + 2)
    anatomy = describe_scar(scarred, "apical", reference)
    assert anatomy.segments == (13, 14)
    assert anatomy.segment_extent[13] > 0.9
    assert transmurality_class(anatomy.segment_extent[14]) == "1-25%"


# segment boundaries of each level at reference 120 (the apex has none)
BOUNDARIES = {level: [lo for _, lo, _ in rows] for level, rows in TABLE.items()} | {"apex": [0.0]}


@pytest.mark.parametrize("level", ["basal", "mid", "apical", "apex"])
@pytest.mark.parametrize("reference", [120.0, 100.0, 137.5, 300.0, 47.3])
def test_random_wedge_scars_are_always_described(level, reference):
    label, angle, r = ring()
    segment_map = aha_segments(label, level, reference)
    rng = np.random.default_rng(int(reference * 10) + len(level))
    for k in range(30):
        if k % 2:  # a sliver near a segment boundary
            start = rng.choice(BOUNDARIES[level]) + reference - 120 + rng.uniform(-3, 2)
            width = rng.uniform(0.5, 4)
        else:
            start, width = rng.uniform(0, 360), rng.uniform(5, 150)
        depth = rng.uniform(0.05, 1.0)
        scarred = label.copy()
        scarred[(label == 2) & ((angle - start) % 360 < width) & (r <= R_IN + depth * (R_OUT - R_IN + 1))] = 3
        if not (scarred == 3).any():
            continue
        anatomy = describe_scar(scarred, level, reference)
        holding = set(np.unique(segment_map[scarred == 3]))
        assert set(anatomy.segment_extent) == holding, (start, width)
        assert anatomy.segments and set(anatomy.segments) <= holding
        assert all(0 < v <= 1 for v in anatomy.segment_extent.values())
        assert anatomy.transmurality == max(anatomy.segment_extent[s] for s in anatomy.segments)


@pytest.mark.parametrize("r_in, r_out", [(15, 25), (20, 28), (25, 40)])
@pytest.mark.parametrize("fraction, klass", [(0.2, "1-25%"), (0.3, "26-50%"), (0.45, "26-50%"), (0.6, "51-75%")])
def test_a_uniform_band_reads_its_fraction(r_in, r_out, fraction, klass):
    # a subendocardial band of constant depth across a segment (the audit's cases): a maximum over the
    # segment's ~16 rays, each about a pixel wide at the endocardium, read 0.20 as 0.28 and 0.45 as 0.54
    label, angle, r = ring(r_in, r_out, size=128, centre=63.5)
    scarred = wedge(label, angle, r, 60, 120, r_in + fraction * (r_out - r_in))
    anatomy = describe_scar(scarred, "mid")
    assert anatomy.segments == (7,)
    assert anatomy.transmurality == pytest.approx(fraction, abs=0.04)
    assert anatomy.transmurality_class == klass


def test_uniform_bands_read_their_fraction_on_thin_and_thick_walls():
    # walls 8, 10, 12 and 15 pixels thick, the LV centre on a pixel and off it; the pixel staircase
    # of the band's edge leaves single segments off by up to ~0.1 on the thinnest wall
    errors, agree = [], 0
    for centre in (64.0, 64.3):
        for r_in, r_out in [(15, 23), (16, 26), (18, 30), (20, 35)]:
            label, angle, r = ring(r_in, r_out, centre=centre)
            for fraction in (0.2, 0.3, 0.45, 0.6):
                anatomy = describe_scar(wedge(label, angle, r, 63, 117, r_in + fraction * (r_out - r_in)), "mid")
                errors.append(anatomy.transmurality - fraction)
                agree += anatomy.transmurality_class == transmurality_class(fraction)
    assert np.abs(errors).mean() < 0.04 and np.abs(errors).max() < 0.12, errors
    assert agree >= 28, errors  # of 32


@pytest.mark.parametrize("width, band", [(10, False), (15, False), (25, False), (12, True), (20, True)])
def test_a_focal_transmural_scar_reads_transmural(width, band):
    # alone, or as the core of a thin band across the segment
    label, angle, r = ring()
    scarred = wedge(label, angle, r, 65, 115, R_IN + 2) if band else label
    scarred = wedge(scarred, angle, r, 90 - width / 2, 90 + width / 2, R_OUT + 1)
    anatomy = describe_scar(scarred, "mid")
    assert anatomy.segments == (7,)
    assert anatomy.transmurality_class == "76-100%" and anatomy.layer == "transmural"


def test_midwall_and_subepicardial_scar_are_named():
    label, angle, r = ring()
    mid = label.copy()
    mid[(label == 2) & (angle >= 160) & (angle < 200) & (r > 22) & (r < 26)] = 3
    assert describe_scar(mid, "mid").layer == "mid-wall"
    epi = label.copy()
    epi[(label == 2) & (angle >= 300) & (angle < 340) & (r > 26)] = 3
    anatomy = describe_scar(epi, "mid")
    assert anatomy.layer == "subepicardial" and anatomy.segments == (11,)
    assert "subepicardial" in caption(epi, "mid")


def test_caption_of_negative_slice_mvo_and_constant_mode():
    label, angle, r = ring()
    assert caption(label, "basal") == "LGE short-axis, basal slice. No enhancement."
    scarred = wedge(label, angle, r, 70, 110, 31)
    scarred[(scarred == 3) & (angle > 85) & (angle < 95) & (r < 22)] = 4
    assert "microvascular obstruction" in caption(scarred, "mid")
    assert caption(scarred, "mid", mode="constant") == CONSTANT_CAPTION
    with pytest.raises(ValueError, match="caption mode"):
        caption(scarred, "mid", mode="fancy")


def test_caption_is_deterministic():
    label, angle, r = ring()
    scarred = wedge(label, angle, r, 200, 280, 24)
    assert caption(scarred, "apical") == caption(scarred.copy(), "apical")


@pytest.mark.parametrize(
    "spec, layer_test",
    [
        (ScarSpec(270.0, 60.0, "subendocardial", 0.5), lambda d: d.min() == 0.0 and d.max() <= 0.5 + 1e-9),
        (ScarSpec(90.0, 40.0, "subepicardial", 0.3), lambda d: d.max() == 1.0 and d.min() >= 0.7 - 1e-9),
        (ScarSpec(180.0, 50.0, "mid-wall", 0.4), lambda d: d.min() >= 0.3 - 1e-9 and d.max() <= 0.7 + 1e-9),
    ],
)
def test_ellipsoid_mask_stays_in_its_region(spec, layer_test):
    label, angle, _ = ring()
    mask = ellipsoid_scar_mask(label, spec)
    assert mask.any() and (label[mask] == 2).all()
    dtheta = (angle[mask] - spec.centre_angle + 180) % 360 - 180
    assert np.abs(dtheta).max() <= spec.angular_width / 2 + 1e-9
    assert layer_test(radial_depth(label)[mask])


def test_ellipsoid_transmurality_is_what_the_caption_reports():
    label, _, _ = ring()
    # class centres: pixel rounding of a 13-pixel wall moves the measured extent by up to ~1/13
    for t, klass in [(0.12, "1-25%"), (0.38, "26-50%"), (0.62, "51-75%"), (0.9, "76-100%")]:
        mask = ellipsoid_scar_mask(label, ScarSpec(270.0, 50.0, "subendocardial", t))
        text = caption(apply_scar(label, mask), "mid")
        assert klass in text, (t, text)


def test_wall_share_depth_counts_the_walls_pixels():
    # a straight wall 10 pixels thick: pixel k's centre lies (k + 0.5) / 10 of the way through it,
    # where radial_depth runs k / 9 from the first pixel's centre to the last one's
    label = np.zeros((12, 40), np.uint8)
    label[:, :20] = 1
    label[:, 20:30] = 2
    k = np.arange(10)
    np.testing.assert_allclose(wall_share_depth(label)[5, 20:30], (k + 0.5) / 10)
    np.testing.assert_allclose(radial_depth(label)[5, 20:30], k / 9)
    assert np.isnan(wall_share_depth(label)[:, 30:]).all() and np.isnan(wall_share_depth(np.where(label == 1, 2, label))).all()


@pytest.mark.parametrize("r_in, r_out", [(15, 22), (18, 30), (22, 29), (20, 35)])
def test_ellipsoid_scar_keeps_to_its_layer(r_in, r_out):
    # grown from the endocardium: reaches it; from the epicardium: reaches that; mid-wall: neither
    label, _, _ = ring(r_in, r_out)
    depth = radial_depth(label)  # 0 exactly on the endocardial border, 1 on the epicardial one
    for centre in (10.0, 100.0, 225.0, 300.0):
        for h in (0.15, 0.25, 0.4, 0.55, 0.75, 0.9, 1.0):
            endo = depth[ellipsoid_scar_mask(label, ScarSpec(centre, 40.0, "subendocardial", h))]
            epi = depth[ellipsoid_scar_mask(label, ScarSpec(centre, 40.0, "subepicardial", h))]
            mid = depth[ellipsoid_scar_mask(label, ScarSpec(centre, 40.0, "mid-wall", h))]
            assert endo.min() == 0.0 and (h > 0.75 or endo.max() < 1.0), (centre, h)
            assert epi.max() == 1.0 and (h > 0.75 or epi.min() > 0.0), (centre, h)
            assert mid.size and 0.0 < mid.min() and mid.max() < 1.0, (centre, h)


@pytest.mark.parametrize(
    "pattern_weights, min_agree",
    [  # measured 0.872, 0.833, 0.894, 0.864 (0.742, 0.753, 0.894, 0.708 with the sampler's depth
        # from the first pixel's centre to the last one's, e / (e + o))
        (None, 0.85),
        ({"ischemic": 1.0}, 0.8),
        ({"midwall": 1.0}, 0.85),
        ({"subepicardial": 1.0}, 0.83),
    ],
)
def test_sampled_scars_are_captioned_in_the_class_they_were_drawn_in(pattern_weights, min_agree):
    # walls 8 and 13 pixels thick, the LV centre on a pixel and off it; the ellipse's tapering and the
    # pixel staircase leave a share of draws one class off, but the class drawn is the class captioned
    cfg = ScarSamplerConfig(pattern_weights=pattern_weights) if pattern_weights else ScarSamplerConfig()
    agree = layer = n = 0
    for r_in, r_out, centre in [(15, 22, 64.0), (18, 30, 64.3), (20, 32, 63.6), (22, 29, 64.0)]:
        label, _, _ = ring(r_in, r_out, centre=centre)
        for level in ("basal", "mid", "apical"):
            for seed in range(30):
                mask, spec = sample_scar(label, level, np.random.default_rng(seed), cfg)
                anatomy = describe_scar(apply_scar(label, mask), level)
                n += 1
                agree += anatomy.transmurality_class == transmurality_class(spec.transmurality)
                layer += anatomy.layer == ("transmural" if anatomy.transmurality_class == "76-100%" else spec.layer)
    assert agree / n >= min_agree, (agree, n)
    assert layer / n >= 0.9, (layer, n)


def test_sampler_is_seeded_and_respects_territories():
    label, _, _ = ring()
    cfg = ScarSamplerConfig(pattern_weights={"ischemic": 1.0})
    draws = []
    for seed in range(30):
        for level in ("basal", "mid", "apical"):
            mask, spec = sample_scar(label, level, np.random.default_rng(seed), cfg)
            again, _ = sample_scar(label, level, np.random.default_rng(seed), cfg)
            np.testing.assert_array_equal(mask, again)
            segs = set(np.unique(aha_segments(label, level)[mask])) - {0}
            assert segs <= set(TERRITORIES[spec.territory]), (spec, segs)
            draws.append(spec.territory)
    assert set(draws) == {"LAD", "RCA", "LCx"}


def test_sampler_config_rejects_bad_values():
    with pytest.raises(ValueError, match="pattern_weights"):
        ScarSamplerConfig(pattern_weights={"ischaemic": 1.0})
    with pytest.raises(ValueError, match="ischemic_transmurality"):
        ScarSamplerConfig(ischemic_transmurality=(0.5, 0.2))


def test_sampler_config_refuses_a_pattern_with_no_class_to_draw():
    only_transmural = {"1-25%": 0.0, "26-50%": 0.0, "51-75%": 0.0, "76-100%": 1.0}
    # mid-wall scar is drawn in 0.2-0.5 by default: both of its classes weigh 0
    with pytest.raises(ValueError, match=r"pattern 'midwall' .* \(1-25%, 26-50%\) has weight 0"):
        ScarSamplerConfig(transmurality_weights=only_transmural)
    with pytest.raises(ValueError, match="pattern 'ischemic'"):
        ScarSamplerConfig(pattern_weights={"ischemic": 1.0}, ischemic_transmurality=(0.3, 0.45),
                          transmurality_weights={"26-50%": 0.0, "1-25%": 1.0})
    # a class at 0 alone is fine (the others weigh 1)
    assert ScarSamplerConfig(transmurality_weights={"1-25%": 0.0}).transmurality_weights == {"1-25%": 0.0}
    # a pattern that is never drawn may have no class left: every draw then succeeds
    cfg = ScarSamplerConfig(pattern_weights={"ischemic": 1.0, "midwall": 0.0}, transmurality_weights=only_transmural)
    assert all(draw_scar_spec("mid", np.random.default_rng(s), cfg).transmurality > 0.75 for s in range(50))


def test_sampler_config_refuses_segment_weights_that_leave_a_scar_nowhere():
    zero = {str(s): 0.0 for s in range(1, 17)}
    with pytest.raises(ValueError, match=r"segment_weights: every weight is 0 \(a missing key weighs 1\)"):
        ScarSamplerConfig(segment_weights=zero)
    # LAD on apical slices is segments 13 and 14 only: its scars there would have nowhere to go
    with pytest.raises(ValueError, match=r"segment_weights: ischemic LAD scar on apical slices .* 13, 14, which all "
                                         r"have weight 0; .* territory_weights\['LAD'\]"):
        ScarSamplerConfig(segment_weights={"13": 0.0, "14": 0.0})
    # subepicardial scar on apical slices is centred in lateral (16) by default
    with pytest.raises(ValueError, match=r"segment_weights: subepicardial scar on apical slices .* segment\(s\) 16,"):
        ScarSamplerConfig(segment_weights={"16": 0.0}, territory_weights={"LAD": 1.0})
    # the same weights are fine where no such scar is drawn
    cfg = ScarSamplerConfig(pattern_weights={"ischemic": 1.0}, territory_weights={"RCA": 1.0},
                            segment_weights={"13": 0.0, "14": 0.0, "16": 0.0})
    assert {draw_scar_spec(level, np.random.default_rng(s), cfg).segment
            for level in ("basal", "mid", "apical") for s in range(40)} == set(TERRITORIES["RCA"])
    # one segment at 0 (the others weigh 1) is never a scar's centre
    cfg = ScarSamplerConfig(pattern_weights={"ischemic": 1.0}, territory_weights={"LAD": 1.0}, segment_weights={"7": 0.0})
    assert {draw_scar_spec("mid", np.random.default_rng(s), cfg).segment for s in range(40)} == {8}
    # a config changed after it was checked is refused when drawing, never drawn uniformly
    cfg.segment_weights["8"] = 0.0
    with pytest.raises(ValueError, match="segment_weights: segments"):
        draw_scar_spec("mid", np.random.default_rng(0), cfg)


def test_sampler_reports_a_wall_too_thin():
    label, _, _ = ring(r_in=29.5, r_out=30.0)
    label[:] = np.where(label == 2, 0, label)  # cavity only: no myocardium at all
    with pytest.raises(ValueError):
        sample_scar(label, "mid", np.random.default_rng(0))


@pytest.mark.parametrize("width", [1, 2, 3])
def test_edge_map_width(width):
    label, _, _ = ring()
    mask = ellipsoid_scar_mask(label, ScarSpec(270.0, 80.0, "subendocardial", 0.8))
    edges = edge_map(mask, width)
    assert (edges <= mask).all() and edges.any()
    if width == 1:
        np.testing.assert_array_equal(edges, find_boundaries(mask, mode="inner", connectivity=2) & mask)
    assert edges.sum() <= edge_map(mask, width + 1).sum()


def test_slice_levels_split_cavity_slices_in_thirds():
    label, _, _ = ring()
    no_cavity = np.where(label == 1, 2, label)
    empty = np.zeros_like(label)
    stack = [empty, label, label, label, label, label, label, label, no_cavity]
    assert slice_levels(stack) == [None, "basal", "basal", "basal", "mid", "mid", "apical", "apical", "apex"]
