"""`python -m megaengine.tools.checkpoint inspect DIR`: what a checkpoint holds, read from its index alone.

DIR is a --save directory (its newest complete checkpoint is shown) or one `iter_NNNNNNN` directory in it.
Prints the layout it was saved at, the iteration and consumed samples, the model config, and every global
tensor with its shape, dtype, number of pieces and size; `--verify` also reads every piece and checks it.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

from megaengine.errors import ConfigError

KIND_ORDER = ("model", "master", "exp_avg", "exp_avg_sq")
ITEMSIZE = {"torch.float32": 4, "torch.float16": 2, "torch.bfloat16": 2, "torch.float64": 8}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megaengine.tools.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="layout, iteration, model config and tensors of a checkpoint")
    inspect.add_argument("dir", help="a --save directory, or one iter_NNNNNNN directory in it")
    inspect.add_argument("--verify", action="store_true", help="read every piece and check sizes and checksums")
    return p.parse_args(argv)


def resolve(path: str) -> tuple[str, int | None]:
    """(root, iteration): an iter_ directory names its iteration; a root means its newest complete one."""
    m = re.fullmatch(r"iter_(\d{7})", os.path.basename(os.path.normpath(path)))
    if m:
        return os.path.dirname(os.path.normpath(path)), int(m.group(1))
    return path, None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def describe(meta: dict, path: str) -> list[str]:
    lay, opt = meta.get("layout", {}), meta.get("optimizer", {})
    scaler = (opt.get("loss_scaler") or {}).get("scale")
    experts = f" (ep {lay['ep']})" if lay.get("ep", 1) > 1 else ""
    lines = [f"checkpoint {path}",
             f"iteration {meta.get('iteration')} | consumed samples {meta.get('consumed_samples')} | optimizer step "
             f"{opt.get('step')} | loss scale {scaler if scaler is not None else '-'}",
             f"saved at tp {lay.get('tp')} pp {lay.get('pp')} dp {lay.get('dp')}{experts} virtual stages "
             f"{lay.get('virtual_stages')} ZeRO stage {lay.get('zero_stage')} | parameters "
             f"{', '.join(meta.get('params_dtype', []))}",
             "model: " + " ".join(f"{k}={v}" for k, v in meta.get("model", {}).items() if k != "extra")]
    rows, totals = {}, {}
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    names = sorted(meta.get("tensors", {}), key=lambda n: (n.split("/", 1)[1], order.get(n.split("/", 1)[0], 9)))
    for name in names:
        entry = meta["tensors"][name]
        kind, key = name.split("/", 1)
        numel = math.prod(entry["shape"])
        size = numel * ITEMSIZE.get(entry["dtype"], 4)
        row = rows.setdefault(key, {"shape": entry["shape"], "kinds": [], "pieces": len(entry["pieces"]), "size": 0})
        row["kinds"].append(f"{kind} {entry['dtype'].replace('torch.', '')}")
        row["size"] += size
        count, nbytes = totals.get(kind, (0, 0))
        totals[kind] = (count + numel, nbytes + size)
    width = max((len(k) for k in rows), default=6)
    lines.append(f"  {'tensor':<{width}}  {'global shape':<14} {'pieces':>6}  {'size':>10}  kinds")
    for key, row in rows.items():
        lines.append(f"  {key:<{width}}  {str(row['shape']):<14} {row['pieces']:>6}  {human(row['size']):>10}  "
                     f"{', '.join(row['kinds'])}")
    for kind, (numel, nbytes) in totals.items():
        lines.append(f"total {kind}: {numel:,} elements, {human(nbytes)}")
    files = meta.get("files", {})
    lines.append(f"files: {len(files)}, {human(sum(files.values()))}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from megaengine.checkpoint import PieceReader, checkpoint_dir, load_meta
        root, iteration = resolve(args.dir)
        iteration, meta = load_meta(root, iteration)
        path = checkpoint_dir(root, iteration)
        print("\n".join(describe(meta, path)))
        if args.verify:
            import torch
            reader = PieceReader(path, meta)
            for name, entry in meta.get("tensors", {}).items():
                for piece in entry["pieces"]:
                    out = torch.empty(piece["sizes"], dtype=getattr(torch, entry["dtype"].split(".")[-1]))
                    reader.read(name, piece["offsets"], piece["sizes"], out)
            print(f"verified {sum(len(e['pieces']) for e in meta.get('tensors', {}).values())} pieces: all intact")
    except ConfigError as e:
        print(f"megaengine: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
