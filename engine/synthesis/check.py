"""``lgesynth check-store``: verify a synthetic store shard by shard.

Checks: the schema's arrays exist with consistent shapes; every shard is readable and marked
complete; the row count matches the plan recorded in the attributes; sample ids are non-empty and
unique; no NaN or infinity; images in [0, 1]; labels are DOMAIN labels (0-4); conditions are 0/1;
``passed`` agrees with ``dice`` and the recorded threshold; a kept sample's scar lies inside its
myocardium, its image is not all zero and its source and caption are not empty (a lost object reads
back as the fill value); rows without a scar (``skip_reason``) never pass. Counts (kept, unique ids)
are of the complete shards, the rows the readers return. Problems are listed, never fixed.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from engine.anatomy.labels import SCAR, VALID_LABELS
from engine.synthesis.store import (
    IMAGE_ARRAYS,
    MARKER,
    ROW_ARRAYS,
    TEXT_ARRAYS,
    ShardReader,
    StoreLayout,
    completed_shards,
    dice_above,
    open_store,
    store_attrs,
)

MAX_LISTED = 20  # problems of one kind listed before the rest are counted
READ_AHEAD = 8  # shards in flight at once (memory: that many shards)


def _shard_problems(rows: dict[str, np.ndarray], start: int, threshold: float | None) -> list[str]:
    problems = []
    where = lambda mask: ", ".join(str(start + int(i)) for i in np.flatnonzero(mask)[:5])  # noqa: E731
    image, dice = rows["image"].astype(np.float64), rows["dice"].astype(np.float64)
    bad = ~np.isfinite(image).reshape(len(image), -1).all(1)
    if bad.any():
        problems.append(f"rows {where(bad)}: image holds NaN or infinity")
    finite = np.where(np.isfinite(image), image, 0.5)
    out = (finite.reshape(len(image), -1).min(1) < 0) | (finite.reshape(len(image), -1).max(1) > 1)
    if out.any():
        problems.append(f"rows {where(out)}: image values outside [0, 1]")
    if not np.isfinite(dice).all():
        problems.append(f"rows {where(~np.isfinite(dice))}: dice is NaN or infinite")
    elif ((dice < 0) | (dice > 1)).any():
        problems.append(f"rows {where((dice < 0) | (dice > 1))}: dice outside [0, 1]")
    label = rows["label"]
    bad = ~np.isin(label, VALID_LABELS).reshape(len(label), -1).all(1)
    if bad.any():
        problems.append(f"rows {where(bad)}: label values outside {list(VALID_LABELS)}")
    bad = ~np.isin(rows["condition"], (0, 1)).reshape(len(label), -1).all(1)
    if bad.any():
        problems.append(f"rows {where(bad)}: condition is not a 0/1 mask")
    passed = rows["passed"].astype(bool)
    skipped = np.asarray([bool(str(r)) for r in rows["skip_reason"]])
    if (passed & skipped).any():
        problems.append(f"rows {where(passed & skipped)}: passed although no scar was drawn")
    if threshold is not None and np.isfinite(dice).all():
        wrong = passed != (dice_above(rows["dice"], threshold) & ~skipped)  # as the filter decided
        if wrong.any():
            problems.append(f"rows {where(wrong)}: passed disagrees with dice > {threshold}")
    # a kept sample's scar is the filter's prediction inside the myocardium: scar pixels need a
    # myocardium ring (labels 2-4) around them, and a passed sample has a non-empty condition
    kept_no_condition = passed & ~rows["condition"].reshape(len(label), -1).any(1)
    if kept_no_condition.any():
        problems.append(f"rows {where(kept_no_condition)}: passed with an empty conditioning mask")
    # a rejected row's image is zero on purpose without keep_rejected; a kept one's never is
    kept_blank = passed & ~rows["image"].reshape(len(label), -1).any(1)
    if kept_blank.any():
        problems.append(f"rows {where(kept_blank)}: passed but the image is all zero")
    ids = [str(s) for s in rows["sample_id"]]
    if any(not s for s in ids):
        problems.append(f"rows {where(np.asarray([not s for s in ids]))}: empty sample_id")
    for name in ("source", "caption"):
        kept_empty = passed & np.asarray([not str(v) for v in rows[name]], bool)
        if kept_empty.any():
            problems.append(f"rows {where(kept_empty)}: passed with an empty {name}")
    kept_scarless = passed & ~(label >= SCAR).reshape(len(label), -1).any(1)
    if kept_scarless.any():
        problems.append(f"rows {where(kept_scarless)}: passed but the label holds no scar")
    return problems


def check_store(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Verify the store at ``url``.

    Returns:
        ``(summary, problems)``: counts (rows, shards, complete shards, kept, unique ids) and one
        line per problem (empty when the store is sound).
    """
    try:
        group = open_store(url, "r", storage_options)
    except ValueError as exc:
        return {}, [str(exc)]
    names = (*IMAGE_ARRAYS, *ROW_ARRAYS, *TEXT_ARRAYS, MARKER)
    missing = [n for n in names if n not in group]
    if missing:
        return {}, [f"{url}: not a synthetic store, missing arrays {missing}"]
    problems: list[str] = []
    n = group["image"].shape[0]
    for name in names[:-1]:
        if group[name].shape[0] != n:
            problems.append(f"{name}: {group[name].shape[0]} rows, image has {n}")
    for name in ("label", "condition"):
        if group[name].shape != group["image"].shape:
            problems.append(f"{name}: shape {group[name].shape}, image has {group['image'].shape}")
    if problems:
        return {"rows": n}, problems
    layout = StoreLayout.of_group(group)
    attrs = store_attrs(group)
    if attrs.get("candidates") is not None and attrs["candidates"] != n:
        problems.append(f"the store holds {n} rows, its plan {attrs['candidates']} candidates")
    if group[MARKER].shape[0] != layout.shards:
        problems.append(f"{MARKER}: {group[MARKER].shape[0]} entries for {layout.shards} shards")
        return {"rows": n}, problems
    threshold = attrs.get("config", {}).get("threshold")
    done = completed_shards(group, read_flags=True)  # the flags' values, not only their objects
    incomplete = np.flatnonzero(~done)
    if len(incomplete):
        problems.append(f"{len(incomplete)} of {layout.shards} shard(s) incomplete: "
                        f"{', '.join(map(str, incomplete[:MAX_LISTED]))} (re-run synthesis to finish them)")
    ids: list[str] = []
    kept = 0
    try:
        reader = ShardReader(group, layout=layout)
    except Exception as exc:  # noqa: BLE001 - name the store and why it failed
        return {"rows": n}, problems + [f"{url}: arrays unreadable ({type(exc).__name__}: {exc})"]
    # shards fetched ahead (all of a shard's arrays at once) while the current one is checked
    for shard, rows in reader.iter_shards(range(layout.shards), ahead=READ_AHEAD):
        start, _ = layout.shard_rows(shard)
        if isinstance(rows, Exception):
            problems.append(f"shard {shard}: unreadable ({type(rows).__name__}: {rows})")
            continue
        if done[shard]:  # an incomplete shard's rows are not read back (store.readable_shards)
            ids += [str(s) for s in rows["sample_id"]]
            kept += int(rows["passed"].astype(bool).sum())
            problems += [f"shard {shard}: {p}" for p in _shard_problems(rows, start, threshold)]
    unique = len(set(ids))
    if unique != len(ids):
        seen: set[str] = set()
        doubled = [s for s in ids if s in seen or seen.add(s)]
        doubled = [s for s in doubled if s]
        if doubled:
            problems.append(f"{len(ids) - unique} duplicate sample id(s), e.g. {doubled[:3]}")
    summary = {"rows": n, "shards": layout.shards, "shards_complete": int(done.sum()), "kept": kept,
               "unique_ids": unique}
    return summary, problems
