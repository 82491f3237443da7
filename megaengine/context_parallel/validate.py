"""Up-front checks of a context-parallel layout: a ConfigError naming the flag, the value and the fix, raised
before any model is built. Torch-free."""
from __future__ import annotations

from math import lcm

from megaengine.errors import ConfigError

COMM_TYPES = ("p2p", "a2a")


def check_context_parallel(cp: int, comm_type: str = "p2p", *, seq_length: int, tp: int = 1,
                           sequence_parallel: bool = False, num_attention_heads: int | None = None,
                           num_query_groups: int | None = None, attention_dropout: float = 0.0,
                           attention_backend: str = "auto") -> None:
    """Sequence: 2·cp equal chunks (each rank holds two), and with sequence parallelism a rank's seq/cp
    tokens split over tp; so seq must divide by lcm(2·cp, cp·tp). a2a: the heads and query groups of a
    tp rank are split over cp, so both must divide by cp·tp."""
    if not isinstance(cp, int) or cp < 1:
        raise ConfigError(f"--context-parallel-size (--cp) must be an integer >= 1, got {cp!r}.")
    if comm_type not in COMM_TYPES:
        raise ConfigError(f"--cp-comm-type={comm_type!r} is not supported; choose p2p (ring attention) or a2a "
                          "(all-to-all, Ulysses).")
    if cp == 1:
        return
    need = lcm(2 * cp, cp * tp) if sequence_parallel else 2 * cp
    if seq_length % need:
        why = (f"2 x --context-parallel-size ({cp}) and --context-parallel-size x tensor-parallel size "
               f"({cp} x {tp}) with --sequence-parallel" if sequence_parallel else
               f"2 x --context-parallel-size = {2 * cp} (each rank holds 2 of 2*cp equal chunks)")
        raise ConfigError(f"--seq-length={seq_length} must be divisible by {why}; use a multiple of {need} "
                          f"(e.g. {seq_length + need - seq_length % need}) or change --cp.")
    if comm_type == "a2a":
        groups = num_query_groups or num_attention_heads
        for flag, value in (("--num-attention-heads", num_attention_heads), ("--num-query-groups", groups)):
            if value is not None and value % (cp * tp):
                raise ConfigError(
                    f"{flag}={value} must be divisible by --context-parallel-size x tensor-parallel size "
                    f"({cp} x {tp} = {cp * tp}) with --cp-comm-type a2a, which splits each rank's heads over cp; "
                    "use --cp-comm-type p2p, or a head count that is a multiple of it.")
    if attention_backend == "sdpa":
        raise ConfigError("--attention-backend sdpa cannot run context-parallel attention (it returns no log-sum-exp "
                          "to merge blocks with); use auto, triton or torch.")
    if attention_dropout:
        raise ConfigError(f"--attention-dropout={attention_dropout}: context-parallel attention has no attention "
                          "dropout; set --attention-dropout 0.")
