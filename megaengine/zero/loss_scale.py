"""Loss scaling for fp16 training, with DeepSpeed's semantics (deepspeed/runtime/fp16/loss_scaler.py).

`DynamicLossScaler`: start at 2**initial_scale_power; on an overflowing step the step is skipped and, once
`hysteresis` overflows have been absorbed, the scale halves (never below `min_loss_scale`); after
`loss_scale_window` consecutive clean steps it doubles and hysteresis is refilled. `StaticLossScaler` keeps a
fixed scale (`fp16.loss_scale` > 0) and still reports overflows so the step is skipped.
"""
from __future__ import annotations

import logging

log = logging.getLogger("megaengine.zero")


class StaticLossScaler:
    dynamic = False

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def update(self, overflow: bool) -> None:
        if overflow:
            log.warning("OVERFLOW! Skipping step (static loss scale %g).", self.scale)

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler:
    dynamic = True

    def __init__(self, initial_scale_power: int = 16, loss_scale_window: int = 1000, hysteresis: int = 2,
                 min_loss_scale: float = 1.0, consecutive_hysteresis: bool = False):
        self.scale = 2.0 ** initial_scale_power
        self.window = loss_scale_window
        self.hysteresis = hysteresis
        self.min_scale = float(min_loss_scale)
        self.consecutive_hysteresis = consecutive_hysteresis
        self.cur_hysteresis = hysteresis
        self.iteration = 0
        self.last_overflow_iteration = -1

    def update(self, overflow: bool) -> None:
        if overflow:
            if self.hysteresis == 1 or self.cur_hysteresis == 1:
                lowered = max(self.scale / 2.0, self.min_scale)
                log.warning("OVERFLOW! Skipping step. Attempted loss scale: %g, reducing to %g", self.scale, lowered)
                self.scale = lowered
            else:
                log.warning("OVERFLOW! Skipping step. Attempted loss scale: %g, hysteresis %d -> %d",
                            self.scale, self.cur_hysteresis, self.cur_hysteresis - 1)
                self.cur_hysteresis -= 1
            self.last_overflow_iteration = self.iteration
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.hysteresis
            stable = self.iteration - self.last_overflow_iteration - 1
            if stable > 0 and stable % self.window == 0:
                self.cur_hysteresis = self.hysteresis
                self.scale *= 2.0
        self.iteration += 1

    def state_dict(self) -> dict:
        return {"scale": self.scale, "cur_hysteresis": self.cur_hysteresis, "iteration": self.iteration,
                "last_overflow_iteration": self.last_overflow_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.cur_hysteresis = state.get("cur_hysteresis", self.hysteresis)
        self.iteration = state.get("iteration", 0)
        self.last_overflow_iteration = state.get("last_overflow_iteration", -1)


def loss_scaler_for(fp16) -> StaticLossScaler | DynamicLossScaler | None:
    """The scaler an `fp16` section (zero.config.FP16Config) asks for: none unless enabled; a static scale when
    `loss_scale` > 0, else dynamic."""
    if not fp16.enabled:
        return None
    if fp16.loss_scale > 0:
        return StaticLossScaler(fp16.loss_scale)
    return DynamicLossScaler(fp16.initial_scale_power, fp16.loss_scale_window, fp16.hysteresis, fp16.min_loss_scale,
                             fp16.consecutive_hysteresis)
