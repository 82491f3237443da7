"""Backend "auto" (megaengine.kernels.select): with an injected timer, the fastest correct candidate wins,
wrong or refusing candidates are excluded, a choice is timed once per key (in process and through the cache
file) and printed once; on CPU the torch path runs without timing. No speed is measured here."""
import pytest
import torch
import torch.nn.functional as F

from megaengine.kernels import select
from megaengine.kernels.select import Candidate, Selector


class FakeTimer:
    """Seconds by run function, counting calls; every timed function is also run once."""

    def __init__(self, seconds=None):
        self.seconds, self.calls = seconds or {}, []

    def __call__(self, run):
        self.calls.append(run)
        run()
        return self.seconds.get(run, 1.0)


def refuse():
    raise RuntimeError("No available kernel. Aborting execution.\nsecond line")


def made_up(timer):
    """Candidates: "wrong" is fastest but off the reference, "refuses" raises, "fast" beats "slow"."""
    runs = {name: (lambda: None) for name in ("wrong", "refuses", "fast", "slow")}
    timer.seconds.update({runs["wrong"]: 1e-4, runs["fast"]: 1e-3, runs["slow"]: 2e-3})
    return [Candidate("wrong", runs["wrong"], lambda: 0.5), Candidate("refuses", runs["refuses"], refuse),
            Candidate("slow", runs["slow"], lambda: 1e-6), Candidate("fast", runs["fast"], lambda: 1e-3)]


NAMES = ("wrong", "refuses", "fast", "slow", "torch")


def test_fastest_correct_candidate_wins_and_is_printed(tmp_path):
    timer, lines = FakeTimer(), []
    selector = Selector(timer=timer, cache_file=str(tmp_path / "b.json"), printer=lines.append)
    assert selector.choose("op|k", lambda: made_up(timer), 1e-2, fallback="torch", names=NAMES) == "fast"
    assert len(timer.calls) == 2  # only the two correct ones were timed
    assert lines == ["megaengine auto backend: op|k -> fast [timed: fast 1.000 ms, slow 2.000 ms; excluded: "
                     "wrong (error 5.0e-01 > 1e-02); refuses (No available kernel. Aborting execution.)]"]


def test_nan_error_is_excluded(tmp_path):
    timer = FakeTimer()
    selector = Selector(timer=timer, cache_file=str(tmp_path / "b.json"), printer=lambda _: None)
    nan = [Candidate("nan", lambda: None, lambda: float("nan")), Candidate("ok", lambda: None, lambda: 0.0)]
    assert selector.choose("op|nan", lambda: nan, 1e-2, fallback="torch", names=("nan", "ok")) == "ok"


def test_choice_is_timed_once_per_key_and_survives_the_process(tmp_path):
    timer, lines, built = FakeTimer(), [], []
    cache = str(tmp_path / "sub" / "b.json")

    def candidates():
        built.append(1)
        return made_up(timer)

    selector = Selector(timer=timer, cache_file=cache, printer=lines.append)
    for _ in range(3):
        assert selector.choose("op|k", candidates, 1e-2, fallback="torch", names=NAMES) == "fast"
    assert len(built) == 1 and len(timer.calls) == 2 and len(lines) == 1
    # A later process (a fresh selector on the same file) reuses the choice without timing, and says so.
    later_timer, later_lines = FakeTimer(), []
    later = Selector(timer=later_timer, cache_file=cache, printer=later_lines.append)
    assert later.choose("op|k", candidates, 1e-2, fallback="torch", names=NAMES) == "fast"
    assert later_timer.calls == [] and len(built) == 1
    assert later_lines == [f"megaengine auto backend: op|k -> fast (cached in {cache})"]
    # Another key is timed afresh; a cached name that is no longer a candidate is not trusted.
    assert later.choose("op|other", lambda: made_up(later_timer), 1e-2, fallback="torch", names=NAMES) == "fast"
    assert len(later_timer.calls) == 2
    assert Selector(timer=timer, cache_file=cache, printer=lambda _: None).choose(
        "op|k", lambda: [Candidate("new", lambda: None, lambda: 0.0)], 1e-2, fallback="torch",
        names=("new", "torch")) == "new"


def test_fallback_when_nothing_qualifies(tmp_path):
    lines = []
    selector = Selector(timer=FakeTimer(), cache_file=str(tmp_path / "b.json"), printer=lines.append)
    assert selector.choose("op|k", lambda: [Candidate("refuses", lambda: None, refuse)], 1e-2,
                           fallback="torch", names=("refuses", "torch")) == "torch"
    assert "-> torch [timed: none; excluded: refuses" in lines[0]


def test_unwritable_cache_only_costs_a_retiming(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    selector = Selector(timer=FakeTimer(), cache_file=str(blocker / "b.json"), printer=lambda _: None)
    assert selector.choose("op|k", lambda: [Candidate("a", lambda: None, lambda: 0.0)], 1e-2, fallback="torch",
                           names=("a", "torch")) == "a"


def test_cpu_takes_the_torch_path_without_timing(tmp_path):
    def boom(run):
        raise AssertionError("nothing is timed on CPU")
    selector = Selector(timer=boom, cache_file=str(tmp_path / "b.json"), printer=boom)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, generator=g) for h in (4, 2, 2))
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert torch.equal(select.attention(q, k, v, 0.0, selector=selector), want)
    x, w, b = torch.randn(3, 5, 32, generator=g), torch.randn(32, generator=g), torch.randn(32, generator=g)
    assert torch.equal(select.norm("LayerNorm", x, w, b, 1e-5, selector=selector),
                       F.layer_norm(x, (32,), w, b, 1e-5))
    assert torch.equal(select.norm("RMSNorm", x, w, None, 1e-6, selector=selector), F.rms_norm(x, (32,), w, 1e-6))


@pytest.mark.parametrize("training", [False, True])
def test_real_attention_candidates(training, device, tmp_path):
    """The real candidates on this device (CPU under the interpreter): each either passes the reference
    check and is timed, or is excluded with the reason; ours and SDPA's math backend always qualify."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 40, 16, generator=g).to(device) for h in (4, 2, 2))
    lines = []
    selector = Selector(timer=FakeTimer(), cache_file=str(tmp_path / "b.json"), printer=lines.append)
    candidates = select.attention_candidates(q, k, v, 0.0, training)
    assert [c.name for c in candidates] == ["triton", "triton-atomic-dq", "sdpa-cudnn", "sdpa-flash",
                                            "sdpa-efficient", "sdpa-math"]
    name = selector.choose("attention|test", lambda: candidates, select.TOLERANCE[torch.float32], "sdpa-math",
                           names=tuple(c.name for c in candidates))
    timed = lines[0].split("timed: ")[1].split(";")[0]
    assert name == "triton" and "sdpa-math 1000.000 ms" in timed
    assert "triton 1000.000 ms" in timed and "triton-atomic-dq 1000.000 ms" in timed
    if device.type == "cpu":
        assert "sdpa-cudnn (" in lines[0]  # no cuDNN attention on CPU tensors
    # With dropout ours is not a candidate (it has none).
    assert not any(name.startswith("triton") for name in select.attention_runners(0.1))


def test_real_norm_candidates(device, tmp_path):
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(6, 48, generator=g).to(device), torch.randn(48).to(device), torch.randn(48).to(device)
    for kind, bias in (("LayerNorm", b), ("RMSNorm", None)):
        lines = []
        selector = Selector(timer=FakeTimer(), cache_file=str(tmp_path / "b.json"), printer=lines.append)
        candidates = select.norm_candidates(kind, x, w, bias, 1e-5, training=True)
        assert selector.choose(f"{kind}|test", lambda: candidates, 1e-3, "torch",
                               names=("triton", "cuda", "torch")) == "triton"
        assert "torch 1000.000 ms" in lines[0]
        if device.type == "cpu":
            assert "excluded: cuda (kernel backend 'cuda' is unavailable" in lines[0]


def test_a_wrong_kernel_is_excluded(device, tmp_path, monkeypatch):
    """A real candidate that computes the wrong thing fails the reference check and is never timed."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 48, generator=g).to(device), torch.randn(48).to(device)
    runners = select.norm_runners("RMSNorm", 1e-6)
    monkeypatch.setattr(select, "norm_runners", lambda kind, eps: {**runners, "triton": lambda x, w, b: 2 * x})
    lines = []
    selector = Selector(timer=FakeTimer(), cache_file=str(tmp_path / "b.json"), printer=lines.append)
    candidates = select.norm_candidates("RMSNorm", x, w, None, 1e-6, training=False)
    assert selector.choose("RMSNorm|test", lambda: candidates, 1e-3, "torch", names=("triton", "cuda", "torch")) \
        == "torch"
    assert "triton (error" in lines[0]


def test_keys_separate_shape_classes(monkeypatch):
    q = torch.empty(2, 8, 1000, 64, dtype=torch.bfloat16)
    k = torch.empty(2, 2, 1000, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Fake GPU")
    env = Selector(cache_file="unused").environment(torch.device("cuda", 0))
    assert env.startswith(f"Fake GPU|torch {torch.__version__}|triton ")
    key = select.attention_key(q, k, 0.0, True, env)
    assert key == f"attention|bfloat16|head_dim 64|gqa 4|causal|seq<=1024|batch*heads<=16|fwd+bwd|{env}"
    assert select.attention_key(q[:, :, :900], k[:, :, :900], 0.0, True, env) == key  # same class
    assert select.attention_key(q, k, 0.1, True, env) != key and select.attention_key(q, k, 0.0, False, env) != key
    x = torch.empty(4096, 2048, dtype=torch.bfloat16)
    assert select.norm_key("RMSNorm", x, x[0], None, env) == \
        f"RMSNorm|bfloat16|weight bfloat16|hidden 2048|bias False|rows<=4096|{env}"
