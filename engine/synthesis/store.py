"""Reading the synthetic store (``synthetic.zarr``, Zarr v3; schema in DESIGN.md).

One row per candidate sample: ``image`` float32 [N, H, W] (intensities in [0, 1], the data layer's
range), ``label`` uint8 [N, H, W] (DOMAIN labels; scar = the quality filter's prediction),
``condition`` uint8 [N, H, W], ``dice`` float32 [N], ``passed`` bool [N], ``caption`` str [N],
``source`` str [N], and ``sample_id`` str [N] (the deterministic sample id). Readable with plain
``zarr.open_group(url)``; any fsspec URL works (credentials from the environment).
"""

from __future__ import annotations

from typing import Any

import numpy as np

REQUIRED = ("image", "label", "passed")


def read_synthetic_arrays(url: str, passed_only: bool = True, storage_options: dict | None = None) -> dict[str, Any]:
    """The store's samples as numpy arrays for downstream training.

    Args:
        url: the store's path or fsspec URL.
        passed_only: keep only samples that passed the quality filter (the default: rejected
            candidates never train a downstream model).
        storage_options: fsspec options (endpoint and the like; never credentials in configs).

    Returns:
        ``image`` float32 [M, 1, H, W] in [0, 1], ``label`` uint8 [M, H, W], ``passed`` bool [M], and
        ``sample_id`` / ``dice`` / ``caption`` / ``source`` where the store has them.
    """
    import zarr

    try:
        group = zarr.open_group(url, mode="r", storage_options=storage_options)
    except Exception as exc:  # noqa: BLE001 - report which store and why
        raise ValueError(f"{url}: cannot open the synthetic store ({type(exc).__name__}: {exc})") from exc
    missing = [name for name in REQUIRED if name not in group]
    if missing:
        raise ValueError(f"{url}: not a synthetic store, missing arrays {missing}")
    passed = np.asarray(group["passed"][:], dtype=bool)
    keep = np.flatnonzero(passed) if passed_only else np.arange(len(passed))
    out: dict[str, Any] = {
        "image": np.asarray(group["image"].oindex[keep], dtype=np.float32)[:, None],
        "label": np.asarray(group["label"].oindex[keep], dtype=np.uint8),
        "passed": passed[keep],
    }
    for name in ("sample_id", "dice", "caption", "source"):
        if name in group:
            values = np.asarray(group[name][:])[keep]
            out[name] = [str(v) for v in values] if values.dtype.kind in "OUS" or name != "dice" else values.astype(np.float32)
    image = out["image"]
    if image.size and (not np.isfinite(image).all() or image.min() < 0 or image.max() > 1):
        raise ValueError(f"{url}: image values must be finite and in [0, 1]")
    return out
