"""Reader of raw Amazon Reviews 2018 files with the MQL4GRec / LC-Rec preprocessing.

Input (one directory, plain or gzip)::

    <Category>_5.json[.gz]      one review per line: reviewerID, asin, unixReviewTime, ...
    meta_<Category>.json[.gz]   one item per line: asin, title, brand, category, description,
                                imageURL / imageURLHighRes

Preprocessing, in the order of LC-Rec's ``amazon18_data_process.py``:

1. sort each user's reviews by time (ties: file order) and, with ``dedupe`` (default, as
   LC-Rec), keep only the first interaction of a repeated (user, item);
2. keep items whose meta record has a non-empty title (and an image URL when
   ``require_images``); reviews of other items are dropped with a warning and count;
3. iterative ``k_core`` filtering (users and items with < k interactions removed until
   stable; default 5), with a warning and count;
4. dense ids by first appearance in the user-grouped, time-ordered interaction list (users
   in order of their first review in the file), which is how LC-Rec numbers them.

Text fields become string columns ``title``, ``brand``, ``categories``, ``description``;
``image_url`` holds the first high-resolution (else low-resolution) image URL.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from qbert.data.dataset import SeqDataset
from qbert.data.errors import DataError
from qbert.data.readers.common import (
    apply_short_user_policy,
    clean_text,
    iter_json_lines,
    require_file,
    warn_filter,
)

_REVIEWS = re.compile(r"^(?P<cat>.+)_5\.json(\.gz)?$")


def find_amazon_categories(directory: Path) -> list[str]:
    return sorted({m.group("cat") for p in Path(directory).iterdir() if (m := _REVIEWS.match(p.name))})


def _find(directory: Path, stem: str) -> Path:
    for suffix in (".json", ".json.gz"):
        if (directory / f"{stem}{suffix}").is_file():
            return directory / f"{stem}{suffix}"
    return require_file(directory / f"{stem}.json[.gz]", "Amazon file")


def _field(obj: dict, key: str, path: Path, lineno: int, kind: type | tuple[type, ...]) -> object:
    if key not in obj:
        raise DataError(f"{path}: line {lineno}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{path}: line {lineno}: field {key!r} has bad value {value!r}")
    return value


def _read_reviews(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    users, items, times = [], [], []
    for lineno, obj in iter_json_lines(path):
        users.append(_field(obj, "reviewerID", path, lineno, str))
        items.append(_field(obj, "asin", path, lineno, str))
        times.append(_field(obj, "unixReviewTime", path, lineno, (int, float)))
    if not users:
        raise DataError(f"{path}: empty dataset (no reviews)")
    return users, items, np.asarray(times, dtype=np.float64)


def _categories(value: object) -> str | None:
    if not isinstance(value, list):
        return clean_text(value)
    kept = []
    for c in value:  # LC-Rec stops at the first HTML fragment
        if "</span>" in str(c):
            break
        kept.append(str(c).strip())
    return clean_text(", ".join(kept))


def _first_url(obj: dict) -> str | None:
    for key in ("imageURLHighRes", "imageURL"):
        urls = obj.get(key)
        if isinstance(urls, str):
            urls = [urls]
        if isinstance(urls, list):
            for u in urls:
                if isinstance(u, str) and u.strip():
                    return u.strip()
    return None


def _read_meta(path: Path, wanted: set[str]) -> dict[str, dict[str, str | None]]:
    meta: dict[str, dict[str, str | None]] = {}
    for lineno, obj in iter_json_lines(path):
        asin = _field(obj, "asin", path, lineno, str)
        if asin not in wanted:
            continue
        if asin in meta:
            raise DataError(f"{path}: line {lineno}: duplicate asin {asin!r}")
        brand = obj.get("brand")
        meta[asin] = {
            "title": clean_text(obj.get("title")),
            "brand": clean_text(brand.replace("by\n", "")) if isinstance(brand, str) else clean_text(brand),
            "categories": _categories(obj.get("category")),
            "description": clean_text(obj.get("description")),
            "image_url": _first_url(obj),
        }
    return meta


def k_core(user: np.ndarray, item: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the interactions kept by iterative k-core filtering of users and items."""
    keep = np.ones(len(user), bool)
    while True:
        uc = np.bincount(user[keep], minlength=user.max() + 1)
        ic = np.bincount(item[keep], minlength=item.max() + 1)
        new = keep & (uc[user] >= k) & (ic[item] >= k)
        if new.sum() == keep.sum():
            return keep
        keep = new


def read_amazon_raw(directory: str | Path, category: str | None = None, *, k_core_threshold: int = 5,
                    require_images: bool = False, dedupe: bool = True, short_users: str = "drop") -> SeqDataset:
    """Read ``<category>_5.json[.gz]`` + ``meta_<category>.json[.gz]`` and preprocess as MQL4GRec."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"dataset directory not found: {directory}")
    if category is None:
        cats = find_amazon_categories(directory)
        if len(cats) != 1:
            raise DataError(f"{directory}: expected one <Category>_5.json[.gz] file, found {cats or 'none'}; pass category=")
        category = cats[0]
    reviews_path = _find(directory, f"{category}_5")
    meta_path = _find(directory, f"meta_{category}")
    users_raw, items_raw, times = _read_reviews(reviews_path)
    user_orig, uidx = np.unique(np.asarray(users_raw, dtype=object).astype(str), return_inverse=True)
    item_orig, iidx = np.unique(np.asarray(items_raw, dtype=object).astype(str), return_inverse=True)
    n = len(uidx)

    order = np.lexsort((np.arange(n), times, uidx))  # per user, by time, ties by file order
    if dedupe:
        pair = uidx[order].astype(np.int64) * len(item_orig) + iidx[order]
        _, first = np.unique(pair, return_index=True)
        kept = np.sort(first)
        if len(kept) < n:
            warn_filter(f"{reviews_path}: dropped {n - len(kept)} repeated (user, item) interaction(s)")
        order = order[kept]

    meta = _read_meta(meta_path, set(item_orig.tolist()))
    ok = np.array([a in meta and meta[a]["title"] is not None and (not require_images or meta[a]["image_url"] is not None)
                   for a in item_orig.tolist()])
    keep = ok[iidx[order]]
    if not keep.all():
        why = "no meta record or empty title" + (" or no image URL" if require_images else "")
        warn_filter(f"{reviews_path}: dropped {int((~keep).sum())} interaction(s) of {int((~ok).sum())} item(s) "
                    f"with {why} in {meta_path.name}")
    order = order[keep]
    if k_core_threshold > 1 and len(order):
        core = k_core(uidx[order], iidx[order], k_core_threshold)
        if not core.all():
            warn_filter(f"{reviews_path}: {k_core_threshold}-core filtering dropped {int((~core).sum())} interaction(s)")
        order = order[core]
    if not len(order):
        raise DataError(f"{reviews_path}: empty dataset after preprocessing (item text/image filter and "
                        f"{k_core_threshold}-core)")

    # LC-Rec numbering: users by first review in the file, items by first appearance in the
    # user-grouped (that user order), time-ordered list
    u_sel, i_sel = uidx[order], iidx[order]
    first_seen = np.full(len(user_orig), n, np.int64)
    np.minimum.at(first_seen, uidx, np.arange(n))  # first review in the file, before any filter
    user_rank = np.argsort(np.argsort(first_seen[np.unique(u_sel)], kind="stable"), kind="stable")
    present_users = np.unique(u_sel)
    urank = np.full(len(user_orig), -1, np.int64)
    urank[present_users] = user_rank
    regroup = np.lexsort((np.arange(len(order)), urank[u_sel]))  # stable: keeps time order per user
    u_sel, i_sel = urank[u_sel][regroup], i_sel[regroup]
    uniq_items, first_pos = np.unique(i_sel, return_index=True)
    item_dense = np.full(len(item_orig), -1, np.int64)
    item_dense[uniq_items[np.argsort(first_pos)]] = np.arange(len(uniq_items))
    flat = item_dense[i_sel]
    counts = np.bincount(u_sel, minlength=len(present_users))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    user_ids = user_orig[present_users[np.argsort(user_rank)]]

    asins = item_orig[uniq_items[np.argsort(first_pos)]].tolist()
    columns: dict[str, pa.Array] = {
        "item_id": pa.array(np.arange(len(asins), dtype=np.int64)),
        "orig_id": pa.array(asins, pa.string()),
    }
    for field in ("title", "brand", "categories", "description", "image_url"):
        columns[field] = pa.array([meta[a][field] for a in asins], pa.string())
    offsets, flat, user_ids = apply_short_user_policy(offsets, flat, user_ids, short_users, str(reviews_path))
    info = {"source": str(directory), "format": "amazon_raw", "category": category,
            "text_columns": ["title", "brand", "categories", "description"],
            "preprocessing": {"k_core": k_core_threshold, "require_images": require_images, "dedupe": dedupe}}
    return SeqDataset(category, pa.table(columns), offsets, flat, user_ids, info)
