"""Simulate a pipeline schedule: timeline, makespan, bubble fraction and peak in-flight micro-batches.

`simulate(schedule, cost, p2p)` runs each rank's list in order; an action starts when its rank is free and
its inputs exist: F of virtual stage k after F of k-1 on the same micro-batch (plus `p2p` when the two are on
different ranks), the backward of k after the backward of k+1, W after B. A combined backward (BW) costs
B + W. Communication actions take no time of their own.

    python -m megaengine.pipeline.simulate --schedule 1f1b --pp 4 --microbatches 8 [--virtual-stages 2]
        [--cost F=1,B=1,W=1] [--p2p 0] [--svg timeline.svg]

draws the timeline in the terminal and prints the bubble and the activation memory. On the command line the
costs are those of a whole stage; with virtual stages each chunk costs 1/v of them.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from megaengine.pipeline.schedules import Action, build, virtual_stage


@dataclass
class Simulation:
    makespan: float
    bubble_fraction: float  # idle time / (stages x makespan)
    peak_inflight: list[int]  # per rank: most (micro-batch, chunk) units with F done and B not yet done
    timeline: list[list[tuple[float, float, Action]]]  # per rank: (start, end, action)
    busy: list[float]  # per rank: time spent computing

    def __getitem__(self, key: str):  # read like a dict, too
        return getattr(self, key)


def duration(action: Action, cost: dict[str, float]) -> float:
    return cost["B"] + cost["W"] if action.kind == "BW" else cost[action.kind]


def peak_inflight(actions: list[Action]) -> int:
    held = peak = 0
    for a in actions:
        if a.kind == "F":
            held += 1
            peak = max(peak, held)
        elif a.kind in ("B", "BW"):
            held -= 1
    return peak


def _ready_time(a: Action, rank: int, p: int, num_virtual: int, end: dict, p2p: float) -> float | None:
    """When the inputs of `a` exist, or None while they do not yet."""
    k = virtual_stage(rank, a.chunk, p)

    def after(key, other_k):
        t = end.get(key)
        if t is None:
            return None
        return t + (p2p if other_k % p != rank else 0.0)

    deps = []
    if a.kind == "F" and k > 0:
        deps.append(after(("F", a.microbatch, k - 1), k - 1))
    if a.kind in ("B", "BW"):
        deps.append(end.get(("F", a.microbatch, k)))
        if k < num_virtual - 1:
            deps.append(after(("G", a.microbatch, k + 1), k + 1))
    if a.kind == "W":
        deps.append(end.get(("G", a.microbatch, k)))
    if any(d is None for d in deps):
        return None
    return max(deps, default=0.0)


def simulate(schedule: list[list[Action]], cost: dict[str, float], p2p: float = 0.0) -> Simulation:
    p = len(schedule)
    lists = [[a for a in actions if not a.is_comm] for actions in schedule]
    num_virtual = p * (1 + max(a.chunk for ops in lists for a in ops))
    end: dict[tuple, float] = {}  # (kind, micro-batch, virtual stage) -> end time; "G": input grad ready
    free = [0.0] * p
    pos = [0] * p
    timeline: list[list[tuple[float, float, Action]]] = [[] for _ in range(p)]
    while any(pos[r] < len(lists[r]) for r in range(p)):
        progress = False
        for r in range(p):
            while pos[r] < len(lists[r]):
                a = lists[r][pos[r]]
                ready = _ready_time(a, r, p, num_virtual, end, p2p)
                if ready is None:
                    break
                start = max(free[r], ready)
                free[r] = start + duration(a, cost)
                k = virtual_stage(r, a.chunk, p)
                end[(a.kind, a.microbatch, k)] = free[r]
                if a.kind in ("B", "BW"):
                    end[("G", a.microbatch, k)] = free[r]
                timeline[r].append((start, free[r], a))
                pos[r] += 1
                progress = True
        if not progress:
            stuck = {r: lists[r][pos[r]] for r in range(p) if pos[r] < len(lists[r])}
            raise ValueError(f"schedule cannot finish: ranks wait forever at {stuck}")
    makespan = max(free)
    busy = [sum(e - s for s, e, _ in row) for row in timeline]
    idle = p * makespan - sum(busy)
    return Simulation(makespan=makespan, bubble_fraction=idle / (p * makespan) if makespan else 0.0,
                      peak_inflight=[peak_inflight(ops) for ops in lists], timeline=timeline, busy=busy)


# ---- drawing ----

def _label(a: Action) -> str:
    return str(a)


def render_text(sim: Simulation, scale: int | None = None) -> str:
    """One row per rank, `scale` characters per time unit (by default just wide enough for the labels)."""
    actions = [(s, e, a) for row in sim.timeline for s, e, a in row]
    if scale is None:
        scale = max(math.ceil((len(_label(a)) + 1) / (e - s)) for s, e, a in actions if e > s)
    width = round(sim.makespan * scale)
    lines = []
    for r, row in enumerate(sim.timeline):
        cells = ["."] * width
        for s, e, a in row:
            lo, hi = round(s * scale), round(e * scale)
            text = _label(a)[: hi - lo].ljust(hi - lo)
            cells[lo:hi] = text
        lines.append(f"stage {r} |{''.join(cells)}|")
    return "\n".join(lines)


_COLORS = {"F": "#4c78a8", "B": "#59a14f", "W": "#f28e2b", "BW": "#76b7b2"}


def render_svg(sim: Simulation, unit: float = 24.0, row: float = 28.0) -> str:
    width = sim.makespan * unit + 80
    height = row * len(sim.timeline) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'font-family="monospace" font-size="11">']
    for r, items in enumerate(sim.timeline):
        y = 5 + r * row
        parts.append(f'<text x="4" y="{y + row / 2 + 4:.1f}">stage {r}</text>')
        for s, e, a in items:
            x, w = 70 + s * unit, (e - s) * unit
            opacity = 1.0 if a.chunk % 2 == 0 else 0.6  # tell chunks apart
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{row - 4:.1f}" '
                         f'fill="{_COLORS[a.kind]}" fill-opacity="{opacity}" stroke="white"/>')
            parts.append(f'<text x="{x + 2:.1f}" y="{y + row / 2 + 2:.1f}" fill="white">{_label(a)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def theory(name: str, p: int, m: int, v: int) -> str:
    """The literature's bubble for equal F, B and W costs, for comparison."""
    if name in ("gpipe", "1f1b") or (name == "interleaved" and v == 1):
        return f"(p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.4f} of the step"
    if name == "interleaved":
        return f"bubble/ideal (p-1)/(v m) = {(p - 1) / (v * m):.4f} (Narayanan et al. 2021)"
    return f"(p-1)/(3m+p-1) = {(p - 1) / (3 * m + p - 1):.4f} of the step (ZB-H1, Qi et al. 2023)"


def _parse_cost(text: str) -> dict[str, float]:
    cost = {"F": 1.0, "B": 1.0, "W": 1.0}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in cost:
            raise SystemExit(f"--cost: unknown key {key!r}; use F=..,B=..,W=..")
        cost[key.strip()] = float(value)
    return cost


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--virtual-stages", type=int, default=1)
    ap.add_argument("--cost", default="F=1,B=1,W=1", help="whole-stage costs of F, B (input grad), W")
    ap.add_argument("--p2p", type=float, default=0.0)
    ap.add_argument("--scale", type=int, default=None, help="characters per time unit")
    ap.add_argument("--svg", default=None, help="also write the timeline as an SVG picture")
    args = ap.parse_args(argv)
    p, m, v = args.pp, args.microbatches, args.virtual_stages
    cost = {k: c / v for k, c in _parse_cost(args.cost).items()}
    sim = simulate(build(args.schedule, p, m, v), cost, args.p2p)
    print(render_text(sim, args.scale))
    ideal = sum(sim.busy) / p
    print(f"\n{args.schedule}: pp={p} microbatches={m} virtual stages={v}  cost per chunk {cost}  p2p={args.p2p}")
    print(f"makespan {sim.makespan:g}  bubble {sim.bubble_fraction:.4f} of the step "
          f"({(sim.makespan - ideal) / ideal:.4f} of the ideal time)")
    print(f"theory: {theory(args.schedule, p, m, v)}")
    unit = "micro-batches" if v == 1 else f"chunk micro-batches (each 1/{v} of a stage's activations)"
    print(f"peak in-flight {unit} per stage: {sim.peak_inflight}")
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(render_svg(sim))
        print(f"wrote {args.svg}")


if __name__ == "__main__":
    main()
