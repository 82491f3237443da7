"""Step overhead of megaengine at tp = pp = dp = 1 against a plain PyTorch training loop, same model.

    python benchmarks/step_overhead.py [--steps 30] [--layers 4 --hidden 256 --seq 256 --batch 8]

The plain loop is written here with nn.Linear, SDPA and torch.optim.AdamW, loaded with megaengine's
initial weights and fed the same batches. The two alternate step by step, in ABBA order, so that drift in
the machine's speed and the cost of running first hit both alike. Prints both median step times and, last, `overhead_ratio=X` (ours / plain).
"""
import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from megaengine import parallel
from megaengine.models import GPT, GPTConfig
from megaengine.zero.optimizer import ZeroOptimizer


class PlainBlock(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):  # (b, s, h)
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=-1)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, cfg: GPTConfig, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, cfg.hidden_size), nn.Embedding(cfg.seq_length, cfg.hidden_size)
        self.blocks = nn.ModuleList(PlainBlock(cfg.hidden_size, cfg.num_attention_heads) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size)

    def forward(self, ids, labels):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    @torch.no_grad()
    def load_from(self, ours: GPT):
        self.wte.weight.copy_(ours.word_embeddings.weight)
        self.wpe.weight.copy_(ours.position_embeddings.weight)
        for blk, layer in zip(self.blocks, ours.layers):
            pairs = [(blk.ln1, layer.input_norm), (blk.ln2, layer.post_attention_norm), (blk.qkv, layer.attention.qkv),
                     (blk.proj, layer.attention.proj), (blk.fc1, layer.mlp.fc1), (blk.fc2, layer.mlp.fc2)]
            for mine, theirs in pairs:
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
        self.ln_f.weight.copy_(ours.final_norm.weight)
        self.ln_f.bias.copy_(ours.final_norm.bias)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()

    state = parallel.initialize()
    device = state.device
    cfg = GPTConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                    seq_length=args.seq, vocab_size=args.vocab, hidden_dropout=0.0, attention_dropout=0.0,
                    make_vocab_size_divisible_by=64)
    ours = GPT(cfg).to(device)
    plain = PlainGPT(cfg, ours.vocab_size).to(device)
    plain.load_from(ours)
    opt_ours = ZeroOptimizer([ours], lr=1e-4, weight_decay=0.1, clip_grad=1.0, dp_group=state.dp_group,
                             tp_group=state.tp_group, pp_group=state.pp_group)
    decay = [p for p in plain.parameters() if p.ndim >= 2]
    no_decay = [p for p in plain.parameters() if p.ndim < 2]
    opt_plain = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
               for _ in range(args.steps + args.warmup)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step_ours(ids):
        opt_ours.zero_grad()
        opt_ours.set_is_last_microbatch(True)
        loss = ours(ids[:, :-1], ids[:, 1:]).mean()
        opt_ours.scale_loss(loss).backward()
        opt_ours.step()
        return loss

    def step_plain(ids):
        opt_plain.zero_grad(set_to_none=True)
        loss = plain(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt_plain.step()
        return loss

    times = {"megaengine": [], "plain": []}
    first = {}
    pair = (("megaengine", step_ours), ("plain", step_plain))
    for i, ids in enumerate(batches):
        # Whichever runs first in a pair pays for the other's cache and allocator state: swap the order every
        # step (ABBA) so that cost falls on both alike.
        for name, fn in (pair if i % 2 == 0 else pair[::-1]):
            sync()
            t = time.perf_counter()
            loss = fn(ids)
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
            first.setdefault(name, loss.item())
    assert math.isclose(first["megaengine"], first["plain"], rel_tol=1e-4), f"models differ: {first}"
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device: {dev} | model: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, batch {args.batch}")
    print(f"first-step loss: megaengine {first['megaengine']:.5f} plain {first['plain']:.5f}")
    for k, v in med.items():
        print(f"median step {k:>10}: {1000 * v:.1f} ms")
    print(f"overhead_ratio={med['megaengine'] / med['plain']:.3f}")
    parallel.destroy()


if __name__ == "__main__":
    main()
