"""The engine's one 2D orientation, and how NIfTI stacks map to it.

A NIfTI short-axis stack holds data ``vol[i, j, k]`` with ``k`` the slice axis. The engine's 2D
slice ``k`` is ``vol[:, :, k].T``: an array ``[row, col]`` with rows along the second voxel axis
and columns along the first, displayed with row 0 at the top (``matplotlib.imshow`` default).
In that frame the RV should lie to the left of the LV (DOMAIN.md section 2). Scanners and
converters differ, so a dataset declares two settings:

- ``mirrored``: flip columns (left-right) after the transpose, for stacks stored as a mirror image;
- ``apex_first``: the slice axis runs apex to base instead of base to apex.

In-plane rotation needs no resampling: it is absorbed by the dataset's AHA reference angle.
"""

from __future__ import annotations

import numpy as np


def volume_to_slices(volume: np.ndarray, mirrored: bool = False, apex_first: bool = False) -> np.ndarray:
    """NIfTI data ``[i, j, k]`` -> base-to-apex stack of 2D slices ``[k, row, col]`` in engine orientation."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D short-axis stack [i, j, k], got shape {volume.shape}")
    stack = np.transpose(volume, (2, 1, 0))
    if mirrored:
        stack = stack[:, :, ::-1]
    if apex_first:
        stack = stack[::-1]
    return np.ascontiguousarray(stack)


def slices_to_volume(stack: np.ndarray, mirrored: bool = False, apex_first: bool = False) -> np.ndarray:
    """Inverse of :func:`volume_to_slices`: ``[k, row, col]`` -> NIfTI data ``[i, j, k]``."""
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"expected a stack of 2D slices [k, row, col], got shape {stack.shape}")
    if apex_first:
        stack = stack[::-1]
    if mirrored:
        stack = stack[:, :, ::-1]
    return np.ascontiguousarray(np.transpose(stack, (2, 1, 0)))


def spacing_to_slices(zooms: tuple[float, float, float]) -> tuple[float, float, float]:
    """Header zooms ``(di, dj, dk)`` in mm -> engine spacing ``(slice, row, col)`` in mm."""
    di, dj, dk = (float(z) for z in zooms[:3])
    return dk, dj, di
