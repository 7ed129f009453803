"""Cardiac short-axis anatomy: AHA segments, radial depth and layers, transmurality, captions,
parametric scar masks and their edge maps (DOMAIN.md sections 2-4)."""

from engine.anatomy.aha import (
    LEVEL_SEGMENTS,
    LEVELS,
    SEGMENT_NAMES,
    TERRITORIES,
    aha_segments,
    segment_centre_angle,
    segment_of_angle,
    slice_levels,
)
from engine.anatomy.geometry import (
    LAYER_NAMES,
    heart_box,
    lv_centre,
    polar_angle,
    radial_depth,
    radial_layers,
    wall_share_depth,
)
from engine.anatomy.captions import CONSTANT_CAPTION, caption
from engine.anatomy.labels import cavity_region, is_positive, myocardium_region, scar_region
from engine.anatomy.masks import ScarSamplerConfig, ScarSpec, apply_scar, edge_map, ellipsoid_scar_mask, sample_scar
from engine.anatomy.transmurality import ScarAnatomy, describe_scar, segment_transmurality, transmurality_class

__all__ = [
    "CONSTANT_CAPTION", "ScarAnatomy", "ScarSamplerConfig", "ScarSpec", "apply_scar", "caption",
    "describe_scar", "edge_map", "ellipsoid_scar_mask", "sample_scar", "segment_transmurality",
    "transmurality_class",
    "LAYER_NAMES", "LEVELS", "LEVEL_SEGMENTS", "SEGMENT_NAMES", "TERRITORIES",
    "aha_segments", "cavity_region", "heart_box", "is_positive", "lv_centre", "myocardium_region",
    "polar_angle", "radial_depth", "radial_layers", "scar_region", "segment_centre_angle",
    "segment_of_angle", "slice_levels", "wall_share_depth",
]
