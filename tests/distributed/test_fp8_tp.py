"""FP8 column- and row-parallel layers at tp=2 (and with sequence parallelism) against the same layers at tp=1.

The amax of a tensor sharded along a reduced dim is MAX-reduced over tp, so every scale equals the tp=1 one
exactly (checked on the scales themselves, and on the delayed-scaling history after each step); outputs and
gradients then differ from tp=1 only by fp32 summation order: relative error <= 1e-5. The MAX all-reduces are
counted: per layer and micro-batch two (tensorwise, rowwise, and delayed scaling before it has a history),
none for delayed scaling afterwards, which instead reduces all layers' amaxes in one call per step.
"""
import pytest
import torch
import torch.distributed as dist

from megaengine.testing import rel_error, run_distributed, single_rank_groups

TOL = 1e-5
S, B, FIN, FOUT = 8, 2, 16, 32  # tokens M = S * B
RECIPES = ("tensorwise", "rowwise", "delayed")


def _full(shape, seed, std=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def _seeded(seed, std):
    return lambda t: t.copy_(_full(t.shape, seed, std))


def _expected_amax_traffic(recipe, kind, warm):
    """(calls, bytes) of all_reduce_max for one forward + backward of one layer at tp > 1"""
    m = S * B
    if recipe == "delayed" and warm:
        return 0, 0
    if recipe == "rowwise":  # column: dy per token, W per input feature; row: x per token, W per output feature
        return 2, 4 * (m + FIN)
    return 2, 8  # one fp32 amax each: column W and dy, row x and W


def _layer_case(rank, world, sp, fmt):
    from megaengine.fp8 import FP8Config, FP8Linear, update_amax_history
    from megaengine.parallel import comm
    from megaengine.tensor_parallel import RowParallelLinear
    group, ref_group, errors, traffic = dist.group.WORLD, single_rank_groups(), {}, {}
    seq_shard = (lambda t: t.chunk(world, 0)[rank]) if sp else (lambda t: t)
    for recipe in RECIPES:
        config = FP8Config(format=fmt, recipe=recipe, amax_history_len=2, amax_compute_algo="max")
        # column: fin -> fout, W split by output rows; row: fout -> fin, W split by input columns
        layers = {
            "column": [FP8Linear(FIN, FOUT, sequence_parallel=s, group=g, fp8=config,
                                 init_method=_seeded(1, 0.05)) for g, s in ((group, sp), (ref_group, False))],
            "row": [RowParallelLinear(FOUT, FIN, sequence_parallel=s, group=g, fp8=config,
                                      init_method=_seeded(2, 0.05)) for g, s in ((group, sp), (ref_group, False))],
        }
        for kind, (tp_layer, ref_layer) in layers.items():
            with torch.no_grad():
                bias = _full(tp_layer.bias.shape if kind == "row" else FOUT, 3)
                tp_layer.bias.copy_(bias if kind == "row" else bias.chunk(world)[rank])
                ref_layer.bias.copy_(bias)
            fin, fout = (FIN, FOUT) if kind == "column" else (FOUT, FIN)
            for step in range(3):
                x_full = _full((S, B, fin), 10 + step, 1.0 + step)
                dy_full = _full((S, B, fout), 20 + step, 1e-3)
                if kind == "column":
                    x, dy = seq_shard(x_full), dy_full.chunk(world, -1)[rank]  # sp: sequence gathered inside
                else:
                    x, dy = x_full.chunk(world, -1)[rank], seq_shard(dy_full)
                x = x.clone().requires_grad_()
                comm.comm_stats.reset()
                y = tp_layer(x)
                y.backward(dy)
                stats = comm.comm_stats
                traffic[(recipe, kind, step)] = (stats.calls["all_reduce_max"], stats.bytes["all_reduce_max"])
                # ring model: an all-reduce of S bytes sends 2 S (n-1)/n = S at n = 2
                volume = stats.volume["all_reduce_max"] - stats.bytes["all_reduce_max"]
                errors[f"{recipe}/{kind}/step{step} volume"] = abs(volume)
                xr = x_full.clone().requires_grad_()
                yr = ref_layer(xr)
                yr.backward(dy_full)
                name = f"{recipe}/{kind}/step{step}"
                if kind == "column":
                    errors[f"{name} y"] = rel_error(y, yr.chunk(world, -1)[rank])
                    errors[f"{name} dx"] = rel_error(x.grad, seq_shard(xr.grad))
                    errors[f"{name} dw"] = rel_error(tp_layer.weight.grad, ref_layer.weight.grad.chunk(world, 0)[rank])
                    errors[f"{name} db"] = rel_error(tp_layer.bias.grad, ref_layer.bias.grad.chunk(world)[rank])
                else:
                    errors[f"{name} y"] = rel_error(y, seq_shard(yr))
                    errors[f"{name} dx"] = rel_error(x.grad, xr.grad.chunk(world, -1)[rank])
                    errors[f"{name} dw"] = rel_error(tp_layer.weight.grad, ref_layer.weight.grad.chunk(world, 1)[rank])
                    errors[f"{name} db"] = rel_error(tp_layer.bias.grad, ref_layer.bias.grad)
                for layer in (tp_layer, ref_layer):
                    layer.zero_grad()
                comm.comm_stats.reset()
                update_amax_history([tp_layer], [group])
                traffic[(recipe, kind, "update")] = (comm.comm_stats.calls["all_reduce_max"],
                                                     comm.comm_stats.bytes["all_reduce_max"])
                update_amax_history([ref_layer], [ref_group])
                if recipe == "delayed":  # the same history and scales, bit for bit
                    for buf in ("amax_history", "scale"):
                        same = torch.equal(getattr(tp_layer.fp8, buf), getattr(ref_layer.fp8, buf))
                        errors[f"{name} {buf} differs"] = 0.0 if same else 1.0
    return errors, traffic


@pytest.mark.parametrize("sp,fmt", [(False, "hybrid"), (True, "e4m3")])
def test_fp8_layers_at_tp2_match_tp1(sp, fmt):
    for rank, (errors, traffic) in enumerate(run_distributed(_layer_case, 2, sp, fmt)):
        for name, err in errors.items():
            assert err <= TOL, f"rank {rank} {name}: {err:.2e} (sp={sp}, {fmt})"
        for recipe in RECIPES:
            for kind in ("column", "row"):
                for step in range(3):
                    want = _expected_amax_traffic(recipe, kind, warm=step > 0)
                    assert traffic[(recipe, kind, step)] == want, (recipe, kind, step)
                # delayed: one call per step for every layer at once (here one layer, 3 fp32 amaxes)
                assert traffic[(recipe, kind, "update")] == ((1, 12) if recipe == "delayed" else (0, 0))


def _scale_case(rank, world):
    """The scale of every operand, quantized from its shard, is the tp=1 scale (or its slice) bit for bit."""
    from megaengine.fp8 import FP8Config, make_scaling
    from megaengine.fp8.linear import operand_shards
    from megaengine.fp8.scaling import DY, W, X
    group, mismatches = dist.group.WORLD, []
    shapes = {X: (S * B, FIN), W: (FOUT, FIN), DY: (S * B, FOUT)}
    for recipe in ("tensorwise", "rowwise", "delayed"):
        scaling = make_scaling(FP8Config(format="hybrid", recipe=recipe))
        for layout in ("column", "row", "tokens"):  # tokens: split over a context-parallel group
            shards = operand_shards(None, None, group) if layout == "tokens" else operand_shards(layout, group)
            for slot in (X, W, DY):
                full = _full(shapes[slot], 30 + slot) * torch.linspace(0.5, 2.0, shapes[slot][1])
                split = shards[slot][0][1] if shards[slot] else None
                shard = full if split is None else full.chunk(world, split)[rank]
                for dim in (0, 1):
                    got = scaling.quantize(shard, slot, dim, shards[slot]).scale
                    want = scaling.quantize(full, slot, dim).scale
                    if split is not None and want.dim() == 2 and want.shape[split] > 1:
                        want = want.chunk(world, split)[rank]
                    if not torch.equal(got, want):
                        mismatches.append((recipe, layout, slot, dim))
    return mismatches


def test_scales_of_shards_are_the_scales_of_the_whole():
    assert run_distributed(_scale_case, 2) == [[], []]


def _token_case(rank, world):
    """Tokens split over a context-parallel group: the same scales, outputs and summed weight gradients as one
    rank holding all tokens (amaxes over tokens are MAX-reduced over the group)."""
    from megaengine.fp8 import FP8Config, fp8_linear, make_scaling, update_amax_history
    group, errors = dist.group.WORLD, {}
    for recipe in RECIPES:
        config = FP8Config(format="hybrid", recipe=recipe, amax_history_len=2, amax_compute_algo="max")
        split, whole = make_scaling(config), make_scaling(config)
        w_full = _full((FOUT, FIN), 1, 0.05)
        for step in range(3):
            x_full = _full((S * B, FIN), 10 + step, 1.0 + step) * torch.linspace(0.2, 3.0, S * B)[:, None]
            dy_full = _full((S * B, FOUT), 20 + step, 1e-3)
            x, w = x_full.chunk(world)[rank].clone().requires_grad_(), w_full.clone().requires_grad_()
            y = fp8_linear(x, w, scaling=split, token_group=group)
            y.backward(dy_full.chunk(world)[rank])
            dist.all_reduce(w.grad)  # as data/context parallelism sums weight gradients
            xr, wr = x_full.clone().requires_grad_(), w_full.clone().requires_grad_()
            yr = fp8_linear(xr, wr, scaling=whole)
            yr.backward(dy_full)
            name = f"{recipe}/step{step}"
            errors[f"{name} y"] = rel_error(y, yr.chunk(world)[rank])
            errors[f"{name} dx"] = rel_error(x.grad, xr.grad.chunk(world)[rank])
            errors[f"{name} dw"] = rel_error(w.grad, wr.grad)
            update_amax_history([split], [group])
            update_amax_history([whole])
            if recipe == "delayed":
                same = all(torch.equal(getattr(split, b), getattr(whole, b)) for b in ("amax_history", "scale"))
                errors[f"{name} history differs"] = 0.0 if same else 1.0
    return errors


def test_tokens_split_over_a_context_parallel_group():
    for rank, errors in enumerate(run_distributed(_token_case, 2)):
        for name, err in errors.items():
            assert err <= TOL, f"rank {rank} {name}: {err:.2e}"
