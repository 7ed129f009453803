"""The embedded phantom LGE cohort: what every number of the engine is measured on without real data.

Short-axis LGE stacks of a small heart in a full thorax, hard in the ways real LGE is hard: scar
whose intensity overlaps the blood pool, imperfect nulling, grey-zone borders and internal
heterogeneity, MVO cores, bright epicardial fat and vessels next to the wall, papillary muscles in
the cavity, partial volume, coil bias and Rician noise. Written in the EMIDEC layout, so the
real-data path is the tested path.

Modules: ``config`` (:class:`PhantomConfig`), ``heart`` and ``thorax`` (geometry), ``scar``
(patterns), ``tissue`` (LGE contrast), ``render`` (numba kernel and image formation), ``patient``
(:func:`generate_patient`), ``cohort`` (:func:`write_phantom_cohort` and the manifest), ``preview``.

Example::

    from engine.phantom import PhantomConfig, write_phantom_cohort
    manifest = write_phantom_cohort("data/phantom", n_patients=100, seed=0)
"""

from engine.phantom.cohort import write_phantom_cohort
from engine.phantom.config import PATTERNS, PhantomConfig
from engine.phantom.patient import PhantomPatient, generate_patient
from engine.phantom.preview import preview_patient, render_preview

__all__ = [
    "PATTERNS", "PhantomConfig", "PhantomPatient", "generate_patient", "preview_patient", "render_preview",
    "write_phantom_cohort",
]
