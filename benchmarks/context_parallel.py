"""Per-rank saved activations, step time and attention traffic of context parallelism at cp 1, 2 and 4.

One GPT (megaengine.models.gpt, fp32) trains on a fixed global sequence; at cp > 1 each rank holds its zigzag
share of it (chunks i and 2cp-1-i) and attention runs by ring (p2p) or all-to-all (a2a). Per rank 0:

- saved activation bytes: every tensor autograd saves for the backward during one forward
  (torch.autograd.graph.saved_tensors_hooks), each storage counted once, parameters excluded; the target is
  1/cp of cp=1 within 5%;
- step time: the median of forward, backward and the gradient all-reduce over the cp ranks (ZeroOptimizer
  stage 0 over dp x cp, as the trainer does) plus the Adam step;
- attention bytes sent per layer per step, counted by megaengine.parallel.comm, over
  context_parallel.cost.attention_send_bytes.

    python benchmarks/context_parallel.py [--seq 2048] [--hidden 256] [--heads 8] [--layers 4] [--steps 3]
        [--cp 1 2 4] [--out results/x.md]

On CPU the ranks are forked gloo processes sharing the machine's cores: the byte counts are exact, the step
times say what a shared CPU does, not what GPUs would.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from megaengine.context_parallel import attention_send_bytes
from megaengine.parallel import comm
from megaengine.testing import run_distributed


class SavedBytes:
    """Bytes of the distinct storages autograd saves for the backward, parameters excluded."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _rank(rank, world, comm_type: str, cfg: dict, steps: int):
    from megaengine import parallel
    from megaengine.context_parallel import split_for_rank
    from megaengine.models.gpt import GPT, GPTConfig
    from megaengine.zero import ZeroOptimizer
    state = parallel.initialize(cp=world)
    config = GPTConfig(num_layers=cfg["layers"], hidden_size=cfg["hidden"], num_attention_heads=cfg["heads"],
                       seq_length=cfg["seq"], vocab_size=cfg["vocab"], hidden_dropout=0.0, attention_dropout=0.0,
                       position_embedding_type="rope", normalization="RMSNorm", swiglu=True)
    model = GPT(config, state.tp_group, cp_group=state.cp_group, cp_comm_type=comm_type)
    opt = ZeroOptimizer([model], stage=0, lr=1e-4, dp_group=state.dp_cp_group, tp_group=state.tp_group,
                        pp_group=state.pp_group)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), generator=torch.Generator().manual_seed(0))
    tokens, labels = (split_for_rank(t, world, rank) for t in (ids[:, :-1], ids[:, 1:]))
    saved, times = SavedBytes(model.parameters()), []
    for i in range(steps + 1):
        comm.comm_stats.reset()
        start = time.perf_counter()
        opt.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack if i == 0 else (lambda t: t), lambda t: t):
            loss = model(tokens, labels).float().mean()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return {"saved": saved.total, "step_s": statistics.median(times[1:]),
            "sent": comm.comm_stats.volume["send" if comm_type == "p2p" else "all_to_all"]}


def run(cps, cfg: dict, steps: int) -> list[dict]:
    rows = []
    for cp in cps:
        for comm_type in (("p2p", "a2a") if cp > 1 else ("-",)):
            r = run_distributed(_rank, cp, comm_type if cp > 1 else "p2p", cfg, steps, timeout=1800)[0]
            sent = attention_send_bytes(comm_type if cp > 1 else "p2p", cp=cp, batch=cfg["batch"], seq=cfg["seq"],
                                        heads=cfg["heads"], kv_heads=cfg["heads"],
                                        head_dim=cfg["hidden"] // cfg["heads"], dtype_bytes=4)
            rows.append({"cp": cp, "comm": comm_type, **r, "theory": sent["forward"] + sent["backward"]})
    return rows


def table(rows: list[dict], cfg: dict) -> str:
    base = rows[0]["saved"]
    lines = ["| cp | comm | tokens per rank | saved activations MiB per rank | x cp / cp=1 | step s | "
             "attention MiB sent per layer per step (/ theory) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        per_layer = r["sent"] / cfg["layers"]
        ratio = f"{per_layer / r['theory']:.3f}" if r["theory"] else "-"
        lines.append(f"| {r['cp']} | {r['comm']} | {cfg['seq'] // r['cp']} | {r['saved'] / 2**20:.2f} | "
                     f"{r['saved'] * r['cp'] / base:.3f} | {r['step_s']:.2f} | {per_layer / 2**20:.2f} ({ratio}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048, help="global sequence length (fixed over cp)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    a = ap.parse_args()
    cfg = {"seq": a.seq, "hidden": a.hidden, "heads": a.heads, "layers": a.layers, "batch": a.batch, "vocab": a.vocab}
    rows = run(sorted(a.cp), cfg, a.steps)
    head = (f"Context parallelism, rank 0: GPT {a.layers} layers x hidden {a.hidden}, {a.heads} heads, RoPE, SwiGLU, "
            f"fp32, global sequence {a.seq} x batch {a.batch}, vocab {a.vocab}. CPU figures ({platform.machine()}, "
            f"torch {torch.__version__}, gloo, forked ranks sharing the cores): step times are not GPU times. "
            "x cp / cp=1: saved activations per rank times cp over those at cp=1 (target 1 +- 0.05).\n")
    text = head + "\n" + table(rows, cfg)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
