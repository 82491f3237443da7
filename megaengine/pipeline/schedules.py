"""Pipeline schedules as data: for each pipeline rank, the ordered list of actions it executes.

Pure Python (no torch): `build(name, num_stages, num_microbatches, virtual_stages)` returns one list of
`Action`s per rank. Compute actions are F (forward), BW (whole backward), or B (input gradient) and W (weight
gradient) for the zero-bubble schedule. Communication is explicit (SEND_F, RECV_F, SEND_B, RECV_B) and a run
of consecutive communication actions is one batch: the executor posts it with a single batch_isend_irecv and
waits for all of it. Each builder groups compute into steps; between two steps sits one batch with the sends
of the step before and the receives of the step after (Megatron's send_forward_recv_backward and, for the
interleaved schedule, send_forward_backward_recv_forward_backward), so every rank's sends meet posted receives.

Virtual stages (interleaved): chunk c on rank r is virtual stage c * num_stages + r, so the activation of
(rank p-1, chunk c) goes to (rank 0, chunk c+1). `validate` checks a schedule exhaustively: every micro-batch
and chunk computed once, F before B before W, each receive matched by the peer's send in the same order on
every channel, and the whole thing completes when a send only completes once its receive is posted (NCCL's
and gloo's behaviour: gloo's send waits for the receive too).
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

from megaengine.parallel.mesh import ConfigError

COMPUTE = ("F", "B", "W", "BW")
COMM = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")


@dataclass(frozen=True)
class Action:
    kind: str  # one of COMPUTE or COMM
    microbatch: int
    chunk: int = 0  # index into this rank's model chunks

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f"c{self.chunk}" if self.chunk else "")

    __repr__ = __str__


# ---- topology: where a chunk's input comes from and where its output goes ----

def virtual_stage(rank: int, chunk: int, num_stages: int) -> int:
    return chunk * num_stages + rank


def next_stage(rank: int, chunk: int, num_stages: int) -> tuple[int, int]:
    """(rank, chunk) of the virtual stage after (rank, chunk)."""
    return (rank + 1, chunk) if rank + 1 < num_stages else (0, chunk + 1)


def prev_stage(rank: int, chunk: int, num_stages: int) -> tuple[int, int]:
    return (rank - 1, chunk) if rank > 0 else (num_stages - 1, chunk - 1)


def is_first(rank: int, chunk: int) -> bool:
    return rank == 0 and chunk == 0


def is_last(rank: int, chunk: int, num_stages: int, virtual_stages: int) -> bool:
    return rank == num_stages - 1 and chunk == virtual_stages - 1


# ---- compute orders, one function per schedule ----
# A builder returns a rank's compute as steps: the actions of one step run back to back, and one batch of
# communication sits between consecutive steps (sends of the step before, receives for the step after).

def _gpipe(p: int, m: int, rank: int) -> list[list[Action]]:
    return [[Action("F", i)] for i in range(m)] + [[Action("BW", i)] for i in range(m)]


def _one_f_one_b(p: int, m: int, rank: int) -> list[list[Action]]:
    """PipeDream-Flush: p-rank-1 warmup forwards, then one forward and one backward in turn."""
    warmup = min(p - rank - 1, m)
    steps = [[Action("F", i)] for i in range(warmup)]
    for i in range(m - warmup):
        steps += [[Action("F", warmup + i)], [Action("BW", i)]]
    return steps + [[Action("BW", i)] for i in range(m - warmup, m)]


def _zb_h1(p: int, m: int, rank: int) -> list[list[Action]]:
    """1F1B with the backward split: rank r holds back its first r W's and runs them at the end, where
    1F1B would sit idle waiting for the last gradients (Qi et al. 2023, ZB-H1). F and B keep 1F1B's order,
    so the activations in flight are 1F1B's."""
    steps = []
    pending_w = deque()
    for [a] in _one_f_one_b(p, m, rank):
        if a.kind == "F":
            steps.append([a])
            continue
        steps.append([Action("B", a.microbatch)])
        pending_w.append(a.microbatch)
        if a.microbatch >= rank:
            steps.append([Action("W", pending_w.popleft())])
    return steps + [[Action("W", i)] for i in pending_w]


def _interleaved(p: int, m: int, rank: int, v: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B: micro-batches go through the chunks in groups of p; the warmup is long
    enough that the first backward of the last chunk can come back before the rank runs dry. A steady step
    is a forward and a backward with a single batch of communication after it (sends of both, receives for
    the next step): that lockstep is what keeps every rank's sends matched by posted receives."""
    if v == 1:
        return _one_f_one_b(p, m, rank)
    total = m * v

    def unit(k: int, forward: bool) -> tuple[int, int]:
        group, within = divmod(k, p * v)
        chunk = within // p
        return group * p + within % p, chunk if forward else v - 1 - chunk

    warmup = min(2 * (p - rank - 1) + (v - 1) * p, total)
    steps = [[Action("F", *unit(k, True))] for k in range(warmup)]
    for k in range(total - warmup):
        steps.append([Action("F", *unit(warmup + k, True)), Action("BW", *unit(k, False))])
    return steps + [[Action("BW", *unit(k, False))] for k in range(total - warmup, total)]


# ---- communication ----

_BATCH_ORDER = {"SEND_F": 0, "SEND_B": 1, "RECV_F": 2, "RECV_B": 3}


def _transfers(step: list[Action], rank: int, p: int, virtual_stages: int, incoming: bool) -> list[Action]:
    """The receives a step needs before it (`incoming`), or the sends of what it produced: activations cross a
    stage boundary forward (F), gradients backward (B, BW)."""
    out, prefix = [], "RECV" if incoming else "SEND"
    for a in step:
        first, last = is_first(rank, a.chunk), is_last(rank, a.chunk, p, virtual_stages)
        forward_edge, backward_edge = (not first, not last) if incoming else (not last, not first)
        if a.kind == "F" and forward_edge:
            out.append(Action(f"{prefix}_F", a.microbatch, a.chunk))
        if a.kind in ("B", "BW") and backward_edge:
            out.append(Action(f"{prefix}_B", a.microbatch, a.chunk))
    return out


def add_communication(steps: list[list[list[Action]]], virtual_stages: int = 1) -> list[list[Action]]:
    """Flatten each rank's steps, with one batch between steps: the sends of what the step before produced
    and the receives of what the step after consumes. Within a batch the order is fixed (sends F, B, then
    receives F, B) so two ranks that share a channel both ways list it alike."""
    p = len(steps)
    out = []
    for rank, rank_steps in enumerate(steps):
        seq, sends = [], []
        for step in rank_steps:
            recvs = _transfers(step, rank, p, virtual_stages, incoming=True)
            seq += sorted(sends + recvs, key=lambda a: _BATCH_ORDER[a.kind]) + step
            sends = _transfers(step, rank, p, virtual_stages, incoming=False)
        out.append(seq + sorted(sends, key=lambda a: _BATCH_ORDER[a.kind]))
    return out


def peer_of(action: Action, rank: int, num_stages: int) -> tuple[int, int]:
    """(rank, chunk) at the other end of a communication action."""
    if action.kind in ("SEND_F", "RECV_B"):
        return next_stage(rank, action.chunk, num_stages)
    return prev_stage(rank, action.chunk, num_stages)


def comm_batches(actions: list[Action]) -> list[list[Action]]:
    """Split a rank's list into steps: one compute action, or a run of communication actions."""
    steps, run = [], []
    for a in actions:
        if a.is_comm:
            run.append(a)
            continue
        if run:
            steps.append(run)
            run = []
        steps.append([a])
    if run:
        steps.append(run)
    return steps


# ---- public entry points ----

def check_config(name: str, num_stages: int, num_microbatches: int, virtual_stages: int = 1) -> None:
    if name not in SCHEDULES:
        raise ConfigError(f"--pipeline-schedule {name!r} is unknown; choose one of {', '.join(SCHEDULES)}.")
    if num_stages < 1 or virtual_stages < 1:
        raise ConfigError(f"--pipeline-model-parallel-size ({num_stages}) and the virtual stages per rank "
                          f"({virtual_stages}) must be >= 1.")
    if num_microbatches < num_stages:
        raise ConfigError(
            f"{num_microbatches} micro-batches for {num_stages} pipeline stages: the pipeline needs at least one "
            f"micro-batch per stage. Raise --global-batch-size (micro-batches = global batch / (micro batch x "
            f"data parallel)) to at least {num_stages} micro-batches, or lower --pipeline-model-parallel-size.")
    if virtual_stages > 1 and name != "interleaved":
        raise ConfigError(f"virtual pipeline stages ({virtual_stages}, --num-layers-per-virtual-pipeline-stage) "
                          f"need --pipeline-schedule interleaved, not {name!r}.")
    if name == "interleaved" and virtual_stages > 1:
        if num_stages < 2:
            raise ConfigError("--pipeline-schedule interleaved with virtual stages needs "
                              "--pipeline-model-parallel-size >= 2.")
        if num_microbatches % num_stages:
            raise ConfigError(
                f"the interleaved schedule needs the number of micro-batches ({num_microbatches}) to be a multiple "
                f"of --pipeline-model-parallel-size ({num_stages}); change --global-batch-size accordingly "
                f"(e.g. {num_microbatches + (-num_microbatches) % num_stages} micro-batches).")


def build(name: str, num_stages: int, num_microbatches: int, virtual_stages: int = 1) -> list[list[Action]]:
    """One action list per pipeline rank for schedule `name`."""
    check_config(name, num_stages, num_microbatches, virtual_stages)
    p, m, v = num_stages, num_microbatches, virtual_stages
    if name == "gpipe":
        compute = [_gpipe(p, m, r) for r in range(p)]
    elif name == "1f1b":
        compute = [_one_f_one_b(p, m, r) for r in range(p)]
    elif name == "zb-h1":
        compute = [_zb_h1(p, m, r) for r in range(p)]
    else:
        compute = [_interleaved(p, m, r, v) for r in range(p)]
    return add_communication(compute, v)


def validate(schedule: list[list[Action]], num_microbatches: int, virtual_stages: int = 1) -> None:
    """Raise ValueError unless the schedule is complete, locally ordered, matched and deadlock-free."""
    p = len(schedule)
    for rank, actions in enumerate(schedule):
        _check_rank(rank, actions, p, num_microbatches, virtual_stages)
    _check_channels(schedule)
    _check_progress(schedule)


def _check_rank(rank: int, actions: list[Action], p: int, m: int, v: int) -> None:
    done = set()  # (kind, mb, chunk) computed or received so far
    for a in actions:
        key = (a.microbatch, a.chunk)
        first, last = is_first(rank, a.chunk), is_last(rank, a.chunk, p, v)
        need = {"F": [] if first else ["RECV_F"], "BW": ["F"] + ([] if last else ["RECV_B"]),
                "B": ["F"] + ([] if last else ["RECV_B"]), "W": ["B"],
                "SEND_F": ["F"], "SEND_B": ["BW"] if ("BW",) + key in done else ["B"],
                "RECV_F": [], "RECV_B": []}[a.kind]
        missing = [k for k in need if (k,) + key not in done]
        if missing:
            raise ValueError(f"rank {rank}: {a} comes before {missing[0]} of the same micro-batch and chunk")
        if (a.kind,) + key in done:
            raise ValueError(f"rank {rank}: {a} appears twice")
        if (a.kind == "SEND_F" and last) or (a.kind == "SEND_B" and first):
            raise ValueError(f"rank {rank}: {a} has no peer")
        done.add((a.kind,) + key)
    for mb in range(m):
        for c in range(v):
            split = ("B", mb, c) in done
            kinds = ["F", "B", "W"] if split else ["F", "BW"]
            for k in kinds:
                if (k, mb, c) not in done:
                    raise ValueError(f"rank {rank}: micro-batch {mb} chunk {c} never runs {k}")


def _channels(schedule: list[list[Action]]):
    """Per directed channel (src, dst): the ordered sends on src and receives on dst, as (mb, chunk, kind)."""
    p = len(schedule)
    sends, recvs = defaultdict(list), defaultdict(list)
    for rank, actions in enumerate(schedule):
        for a in actions:
            if not a.is_comm:
                continue
            peer, peer_chunk = peer_of(a, rank, p)
            kind = a.kind[-1]
            if a.kind.startswith("SEND"):
                # identify the message by the receiver's (micro-batch, chunk) so both ends name it alike
                sends[(rank, peer)].append((a.microbatch, peer_chunk, kind))
            else:
                recvs[(peer, rank)].append((a.microbatch, a.chunk, kind))
    return sends, recvs


def _check_channels(schedule: list[list[Action]]) -> None:
    sends, recvs = _channels(schedule)
    for ch in set(sends) | set(recvs):
        if sends[ch] != recvs[ch]:
            raise ValueError(f"channel rank {ch[0]} -> rank {ch[1]}: sends {sends[ch]} do not match "
                             f"receives {recvs[ch]} in order")


def _check_progress(schedule: list[list[Action]]) -> None:
    """Run the schedule on a model where every operation of a batch is posted at once and completes when
    its partner on the peer is posted: the strictest transport (NCCL's rendezvous sends)."""
    p = len(schedule)
    steps = [comm_batches(a) for a in schedule]
    # number each op by its position on its channel, so partners share (src, dst, index)
    op_ids = []
    counters = defaultdict(int)
    for rank, rank_steps in enumerate(steps):
        ids = []
        for step in rank_steps:
            row = []
            for a in step:
                if not a.is_comm:
                    row.append(None)
                    continue
                peer = peer_of(a, rank, p)[0]
                ch = (rank, peer) if a.kind.startswith("SEND") else (peer, rank)
                row.append(ch + (counters[(ch, a.kind[:4])],))
                counters[(ch, a.kind[:4])] += 1
            ids.append(row)
        op_ids.append(ids)
    pos = [0] * p
    posted = set()  # (src, dst, index, "SEND"/"RECV")
    while any(pos[r] < len(steps[r]) for r in range(p)):
        progress = False
        for r in range(p):
            while pos[r] < len(steps[r]):
                step, ids = steps[r][pos[r]], op_ids[r][pos[r]]
                if not step[0].is_comm:
                    pos[r] += 1
                    progress = True
                    continue
                mine = [i + (a.kind[:4],) for a, i in zip(step, ids)]
                if not set(mine) <= posted:
                    posted.update(mine)
                    progress = True
                partner = {"SEND": "RECV", "RECV": "SEND"}
                if all(i[:3] + (partner[i[3]],) in posted for i in mine):
                    pos[r] += 1
                    progress = True
                    continue
                break
        if not progress:
            stuck = {r: steps[r][pos[r]] for r in range(p) if pos[r] < len(steps[r])}
            raise ValueError(f"schedule deadlocks: ranks blocked at {stuck}")
