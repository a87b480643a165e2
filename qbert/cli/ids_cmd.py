"""``qbert ids show|assign``: the items behind a semantic ID, a prefix or an item, with titles; semantic
IDs for items added after training."""

from __future__ import annotations

import argparse
import json
import sys

from qbert.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ids", help="explore a run's semantic IDs")
    cmds = p.add_subparsers(dest="ids_command", metavar="ACTION")
    cmds.required = True
    show = cmds.add_parser("show", help="items under a semantic-ID prefix, of a whole ID, or beside an item",
                           description="List the items of RUN's catalogue under a prefix of the code tree "
                                       "(with their original IDs and titles) and how they split at the next level.")
    show.add_argument("--run", required=True, help="run directory of `qbert pipeline`")
    what = show.add_mutually_exclusive_group(required=True)
    what.add_argument("--item", help="an original item ID (e.g. an ASIN) or an integer item ID: the items that "
                                     "share its semantic ID up to --depth")
    what.add_argument("--prefix", help="e.g. 'a_12,b_3' or '<a_12><b_3>' or '12,3'")
    what.add_argument("--sid", help="a whole semantic ID, e.g. '<a_12><b_3><c_7><d_1>'")
    show.add_argument("--depth", type=int, default=None,
                      help="with --item: prefix length shared with it (default: all levels but the last)")
    show.add_argument("--limit", type=int, default=50, help="items listed at most (default 50; 0 = all)")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(func=show_cmd)
    assign = cmds.add_parser("assign", help="give items added after training semantic IDs, without retraining",
                             description="Run RUN's trained fusion and RQ-VAE on new items' content features, keep "
                                         "their IDs distinct from every existing one (Sec. 3.4's collision rule; "
                                         "existing items never move) and append them to RUN/new_items.parquet, "
                                         "which `qbert recommend` adds to the catalogue.")
    assign.add_argument("--run", required=True, help="run directory of a semantic-ID `qbert pipeline` run")
    assign.add_argument("--items", required=True,
                        help="parquet of new items: orig_id, the run's feature columns (feat_<name>), text columns")
    assign.add_argument("--device", default="cpu")
    assign.set_defaults(func=assign_cmd)


def show_cmd(args: argparse.Namespace) -> int:
    from qbert.explore import (find_item, item_prefix, levels, load_table, next_level_counts, parse_prefix, token,
                               under_prefix)

    if args.limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {args.limit}")
    table = load_table(args.run, with_added=True)
    k = levels(table)
    focus = None
    if args.item is not None:
        depth = max(1, k - 1) if args.depth is None else args.depth
        if not 1 <= depth <= k:
            raise ConfigError(f"--depth must be between 1 and {k}, got {depth}")
        focus = find_item(table, args.item)
        prefix = item_prefix(table, focus, depth)
    else:
        prefix = parse_prefix(args.prefix if args.prefix is not None else args.sid, k)
        if args.sid is not None and len(prefix) != k:
            raise ConfigError(f"--sid '{args.sid}': a whole semantic ID has {k} tokens (use --prefix for fewer)")
    rows = under_prefix(table, prefix)
    shown = rows if args.limit == 0 else rows.slice(0, args.limit)
    columns = [c for c in ("item_id", "orig_id", "sid", "title", "domain", "added") if c in rows.column_names]
    items = [{c: shown.column(c)[i].as_py() for c in columns} for i in range(shown.num_rows)]
    result = {"prefix": "".join(token(j, c) for j, c in enumerate(prefix)), "items": rows.num_rows,
              "next_level": next_level_counts(rows, len(prefix)), "shown": items}
    if focus is not None:
        result["item"] = {c: table.column(c)[focus].as_py() for c in columns}
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    if focus is not None:
        print(f"item {result['item'].get('orig_id', result['item']['item_id'])}: {result['item']['sid']}")
    print(f"prefix {result['prefix']}: {rows.num_rows} item(s) of {table.num_rows}")
    if result["next_level"]:
        print("next level: " + ", ".join(f"{t} {n}" for t, n in result["next_level"][:20])
              + (" ..." if len(result["next_level"]) > 20 else ""))
    for it in items:
        print("  " + "  ".join(str(it[c]) for c in columns))
    if rows.num_rows > len(items):
        print(f"  ... {rows.num_rows - len(items)} more (--limit 0 lists all)")
    return 0


def assign_cmd(args: argparse.Namespace) -> int:
    from qbert.assign import NEW_ITEMS, assign_new_items, read_new_items

    items = read_new_items(args.items)
    rows = assign_new_items(args.run, items, args.device, source=str(args.items))
    moved = int(sum(rows.column("moved").to_pylist()))
    print(f"assigned {rows.num_rows} semantic ID(s) ({moved} moved by the collision rule) -> {args.run}/{NEW_ITEMS}")
    for i in range(min(rows.num_rows, 10)):
        print(f"  {rows.column('orig_id')[i].as_py()}  {rows.column('sid')[i].as_py()}")
    return 0
