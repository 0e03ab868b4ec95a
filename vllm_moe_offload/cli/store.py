"""List a store directory's files, and prune what no engine uses.

    vllm-moe-offload store [DIR] [--prune] [--unused-days N] [--model NAME] [--dry-run]

DIR: the disk store's directory (default: VLLM_MOE_OFFLOAD_STORE_DIR, else
~/.cache/vllm_moe_offload). A store is one file per model and identity (vLLM
version, dtype, bit width, kernel), so each upgrade leaves the old one behind. The
listing marks the files in use (an engine holds them open; a build holds its lock).
--prune removes the stores, and mixed-precision hot sets, unused (not opened by an
engine) for --unused-days, and the partial files of builds that died. A file in use
is never removed; an engine that starts later rebuilds what it needs.
"""

from __future__ import annotations

import argparse
import os
import time

from vllm_moe_offload.core.config import DEFAULT_STORE_DIR, ENV_PREFIX
from vllm_moe_offload.runtime.store_dir import is_model, model_prefix, prune, removable, scan


def _age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def listing(files, now: float) -> str:
    rows = ["| file | kind | GiB | last used | in use | built for |", "|---|---|---|---|---|---|"]
    for f in files:
        rows.append(f"| {f.path.name} | {f.kind} | {f.nbytes / 2**30:.2f} | "
                    f"{_age(now - f.last_used)} ago | {'yes' if f.in_use else 'no'} | "
                    f"{f.detail} |")
    total = sum(f.nbytes for f in files)
    rows.append(f"\n{len(files)} files, {total / 2**30:.2f} GiB")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="?",  # (an empty variable is an unset one, as for engines)
                   default=os.environ.get(ENV_PREFIX + "STORE_DIR") or DEFAULT_STORE_DIR)
    p.add_argument("--prune", action="store_true",
                   help="remove what no engine uses (see --unused-days)")
    p.add_argument("--unused-days", type=float, default=14.0,
                   help="with --prune: remove stores not opened for this many days "
                        "(default 14; 0: every store not in use now)")
    p.add_argument("--model", help="only this model's files (a checkpoint directory, "
                                   "a hub id or a directory's name)")
    p.add_argument("--dry-run", action="store_true", help="with --prune: only list")
    args = p.parse_args(argv)
    if args.unused_days < 0:
        p.error(f"--unused-days {args.unused_days}: give 0 or more days")
    directory = os.path.expanduser(args.dir)
    if not os.path.isdir(directory):
        p.error(f"{directory}: no such directory (the store directory is "
                "--expert-store-dir, or VLLM_MOE_OFFLOAD_STORE_DIR)")
    now = time.time()
    files = scan(directory, details=True)
    if args.model:  # its stores, and their partial files and hot sets
        ours = {model_prefix(f.path.name) for f in files
                if f.kind != "hot set" and is_model(f, args.model)}
        files = [f for f in files if model_prefix(f.path.name) in ours]
    print(f"{directory}:\n{listing(files, now)}")
    if not args.prune:
        return 0
    chosen = removable(files, args.unused_days, now, args.model)
    gone, kept, failed = (chosen, [], []) if args.dry_run else prune(directory, chosen)
    verb = "would remove" if args.dry_run else "removed"
    print(f"\n{verb} {len(gone)} files, {sum(f.nbytes for f in gone) / 2**30:.2f} GiB"
          + "".join(f"\n  {f.path.name}" for f in gone))
    for f, why in kept:
        print(f"kept {f.path.name}: {why}")
    for f, error in failed:
        print(f"could not remove {f.path.name}: {error}")
    return 1 if failed else 0
