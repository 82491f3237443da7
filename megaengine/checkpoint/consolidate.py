"""The whole model in one process from a checkpoint of any layout: for export, inspection and notebooks."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaengine.checkpoint.buffers import load_buffers
from megaengine.checkpoint.pieces import PieceReader
from megaengine.checkpoint.store import checkpoint_dir, load_meta


def consolidated_state_dict(root: str, kind: str = "model", tag: int | str | None = None) -> tuple[dict, dict]:
    """(model config dict, {name: full tensor}) of one kind, at tp=1 naming: fused parts joined again, the
    vocabulary unpadded. It holds the whole model, so use it in one process."""
    tag, meta = load_meta(root, tag)
    reader = PieceReader(checkpoint_dir(root, tag), meta)
    parts: dict = {}
    out = {}
    for name, entry in meta.get("tensors", {}).items():
        if not name.startswith(kind + "/"):
            continue
        t = reader.read_whole(name)
        key = name[len(kind) + 1:]
        if "#" in key:
            base, i = key.split("#")
            parts.setdefault(base, {})[int(i)] = (t, entry["concat_dim"])
        else:
            out[key] = t
    for base, pieces in parts.items():
        out[base] = torch.cat([pieces[i][0] for i in sorted(pieces)], dim=pieces[0][1])
    return meta.get("model", {}), dict(sorted(out.items()))


def load_model(root: str, device="cpu"):
    """The whole GPT (tp=1, one stage) with the weights of the checkpoint under `root`, whatever its layout."""
    from megaengine.models import GPT, GPTConfig
    from megaengine.parallel.mesh import init_distributed
    config_dict, tensors = consolidated_state_dict(root)
    init_distributed()
    group = (dist.group.WORLD if dist.get_world_size() == 1
             else dist.new_group([dist.get_rank()], use_local_synchronization=True))
    model = GPT(GPTConfig.from_dict(config_dict), group)
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = tensors[model.global_name(name)]
            p.data = torch.zeros(p.shape, dtype=full.dtype)
            p.data[:full.shape[0]].copy_(full)  # vocabulary rows past vocab_size are padding
    load_buffers(model, consolidated_state_dict(root, "buffer")[1], model.global_name)  # FP8 scaling state
    return model.to(device)
