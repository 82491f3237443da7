"""The (dp, pp, cp, tp) mesh and the groups cut from it, expert groups carved out of dp (Megatron's layout)."""
import pytest
import torch.distributed as dist

from megaengine.errors import ConfigError
from megaengine.parallel import check_layout
from megaengine.testing import run_distributed


def _groups(rank, world, tp, pp, cp, ep):
    from megaengine import parallel
    s = parallel.initialize(tp=tp, pp=pp, cp=cp, ep=ep)

    def members(group):
        return None if group is None else sorted(dist.get_process_group_ranks(group))
    return {name: members(getattr(s, f"{name}_group")) for name in
            ("tp", "pp", "cp", "dp", "dp_cp", "ep", "expert_dp", "embedding")}


def coords(rank, pp, cp, tp):
    """(d, p, c, t) of a global rank: rank = ((d * pp + p) * cp + c) * tp + t."""
    t, rest = rank % tp, rank // tp
    c, rest = rest % cp, rest // cp
    return rest // pp, rest % pp, c, t


@pytest.mark.parametrize("tp,pp,cp,ep", [(2, 1, 2, 1), (1, 2, 1, 2), (1, 1, 2, 2), (2, 2, 1, 1)])
def test_groups_follow_the_mesh(tp, pp, cp, ep):
    world = 8
    dp = world // (tp * pp * cp)
    for rank, g in enumerate(run_distributed(_groups, world, tp, pp, cp, ep)):
        d, p, c, t = coords(rank, pp, cp, tp)
        every = range(world)

        def same(*keep):
            mine = dict(d=d, p=p, c=c, t=t)
            return [r for r in every if all(dict(zip("dpct", coords(r, pp, cp, tp)))[k] == mine[k] for k in keep)]
        assert g["tp"] == same("d", "p", "c") and g["pp"] == same("d", "c", "t") and g["cp"] == same("d", "p", "t")
        assert g["dp"] == same("p", "c", "t") and g["dp_cp"] == same("p", "t")
        experts = [r for r in same("p", "t") if coords(r, pp, cp, tp)[0] % ep == d % ep]
        assert g["expert_dp"] == experts and len(experts) == dp // ep * cp
        if ep > 1:
            assert g["ep"] == [r for r in same("p", "c", "t") if coords(r, pp, cp, tp)[0] // ep == d // ep]
        if pp > 1:
            assert g["embedding"] == [r for r in same("d", "c", "t") if coords(r, pp, cp, tp)[1] in (0, pp - 1)]


@pytest.mark.parametrize("args,needle", [
    ((8, 2, 1, None, 3), "world size 8 is not divisible by tp x pp x cp = 2 x 1 x 3 = 6"),
    ((8, 1, 1, None, 1, 3), "--expert-model-parallel-size 3 must divide the data-parallel size 8"),
    ((8, 1, 1, None, 0), "--context-parallel-size (--cp) must be an integer >= 1"),
])
def test_bad_layouts_name_the_flag(args, needle):
    with pytest.raises(ConfigError) as e:
        check_layout(*args)
    assert needle in str(e.value)
