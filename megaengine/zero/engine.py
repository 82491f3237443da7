"""`initialize(model, config)` -> ZeroEngine: DeepSpeed's training-engine interface over ZeroOptimizer.

    engine = megaengine.initialize(model=model, config="configs/zero/zero2.json", cli={"lr": 3e-4, ...})
    for batch in loader:                       # one micro-batch per call, as with DeepSpeed
        loss = engine(batch)
        engine.backward(loss)                  # divides by gradient_accumulation_steps, scales for fp16
        engine.step()                          # optimizer step only at accumulation boundaries
    engine.save_checkpoint("ckpt")             # the resharding format of megaengine.checkpoint

The model is cast to bf16/fp16 when the config enables it (fp32 master weights live in the optimizer). LR
schedules (WarmupLR, WarmupDecayLR, WarmupCosineLR) follow DeepSpeed: the scheduler starts at iteration -1
and advances after each applied (not skipped) step. Checkpoints are pretrain_gpt.py's: atomic, optionally
written in the background, and loadable at another dp size or ZeRO stage.
"""
from __future__ import annotations

import json
import logging
import time

import torch
import torch.distributed as dist

from megaengine.checkpoint import Checkpointer, Layout, checkpoint_dir, load_buffers, named_buffers
from megaengine.fp8 import set_grad_divisor, update_amax_history
from megaengine.parallel.mesh import ConfigError
from megaengine.training.lr_schedule import scheduler_lr
from megaengine.zero.config import DeepSpeedConfig, OptimConfig, load_config
from megaengine.zero.optimizer import ZeroOptimizer

log = logging.getLogger("megaengine.zero")
COUNTERS = ("micro_steps", "global_steps", "skipped_steps", "lr_iteration")


class ZeroEngine:
    def __init__(self, model: torch.nn.Module, config: DeepSpeedConfig, *, dp_group=None, tp_group=None,
                 pp_group=None, async_save: bool = False):
        self.module, self.config = model, config
        if config.bf16:
            model.to(torch.bfloat16)
        elif config.fp16.enabled:
            model.to(torch.float16)
        self.optimizer = ZeroOptimizer.from_config([model], OptimConfig.from_deepspeed(config), dp_group=dp_group,
                                                   tp_group=tp_group, pp_group=pp_group)
        self.groups = (dp_group, tp_group)
        set_grad_divisor([model], self.optimizer.dp_size)  # FP8 histories in the global batch's units
        self.checkpointer = Checkpointer(async_save=async_save)
        self.gas = config.gradient_accumulation_steps
        self.micro_steps = self.global_steps = self.skipped_steps = 0
        self.lr_iteration = int(config.scheduler.params.get("last_batch_iteration", -1))
        self.last_grad_norm: float | None = None
        self.timers = {"forward": 0.0, "backward": 0.0, "step": 0.0}
        self.optimizer.zero_grad()

    # -- training ------------------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return scheduler_lr(self.config.scheduler, self.config.optimizer.lr, self.lr_iteration)

    @property
    def loss_scale(self) -> float:
        return self.optimizer.loss_scale

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gas == 0

    def __call__(self, *inputs, **kwargs):
        t = time.perf_counter()
        out = self.module(*inputs, **kwargs)
        self.timers["forward"] += time.perf_counter() - t
        return out

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        self.optimizer.set_is_last_microbatch(self.is_gradient_accumulation_boundary())
        self.optimizer.scale_loss(loss / self.gas).backward()
        self.timers["backward"] += time.perf_counter() - t
        return loss

    def step(self) -> None:
        """Call after every micro-batch; the optimizer steps at accumulation boundaries."""
        t = time.perf_counter()
        if self.is_gradient_accumulation_boundary():
            self._update_fp8_scales()
            self.last_grad_norm, skipped = self.optimizer.step(lr=self.lr)
            self.global_steps += 1
            if skipped:
                self.skipped_steps += 1
            else:
                self.lr_iteration += 1
            self.optimizer.zero_grad()
            self._report()
        self.micro_steps += 1
        self.timers["step"] += time.perf_counter() - t

    def _update_fp8_scales(self) -> None:
        """FP8 layers with delayed scaling (megaengine.fp8): the step's amaxes, MAX-reduced over tp and dp, go into
        their histories. Nothing to do without them."""
        dp_group, tp_group = self.groups
        update_amax_history([self.module], groups=(dp_group,) + ((tp_group,) if tp_group is not None else ()))

    def _report(self) -> None:
        if self.global_steps % self.config.steps_per_print or dist.get_rank() != 0:
            return
        log.info("step %d: lr %.3e, grad norm %.4f, loss scale %g, skipped %d", self.global_steps, self.lr,
                 self.last_grad_norm, self.loss_scale, self.skipped_steps)
        if self.config.wall_clock_breakdown:
            log.info("time (s): " + ", ".join(f"{k} {v:.3f}" for k, v in self.timers.items()))

    def memory_report(self) -> dict:
        return self.optimizer.memory_report()

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _layout(self) -> Layout:
        dp_group, tp_group = self.groups
        tp_rank, tp = (0, 1) if tp_group is None else (dist.get_rank(tp_group), dist.get_world_size(tp_group))
        return Layout(tp=tp, dp=self.optimizer.dp_size, zero_stage=self.optimizer.stage, tp_rank=tp_rank,
                      replica=self.optimizer.dp_rank)

    def save_checkpoint(self, save_dir: str, tag: int | str | None = None, client_state: dict | None = None) -> str:
        """Collective. `tag` defaults to the global step (directory iter_NNNNNNN); `client_state` must be JSON."""
        tag = self.global_steps if tag is None else tag
        try:
            client = json.loads(json.dumps(client_state or {}))
        except TypeError as e:
            raise ConfigError(f"save_checkpoint: client_state must be JSON-serialisable ({e}).") from None
        meta = {"engine": {k: getattr(self, k) for k in COUNTERS}, "client_state": client}
        self.checkpointer.save(save_dir, tag, named_params=list(self.module.named_parameters()),
                               optimizer=self.optimizer, layout=self._layout(), meta=meta,
                               buffers=named_buffers(self.module))
        return checkpoint_dir(save_dir, tag)

    def load_checkpoint(self, load_dir: str, tag: int | str | None = None) -> tuple[str, dict]:
        """Collective: the newest checkpoint under `load_dir` (or `tag`), at this engine's dp size and ZeRO stage
        whatever they were at save time. Returns (its directory, client_state)."""
        loaded = self.checkpointer.load(load_dir, tag, named_params=list(self.module.named_parameters()),
                                        optimizer=self.optimizer, layout=self._layout(), check=_engine_checkpoint,
                                        buffers=[name for name, _ in named_buffers(self.module)])
        load_buffers(self.module, loaded.buffers)
        for k in COUNTERS:
            setattr(self, k, int(loaded.meta["engine"][k]))
        return loaded.path, loaded.meta["client_state"]


def _engine_checkpoint(meta: dict, path: str) -> None:
    if "engine" not in meta:
        raise ConfigError(f"{path}: a pretrain_gpt.py checkpoint, not an engine's; load it with "
                          "megaengine.load_model or pretrain_gpt.py --load.")


def initialize(model: torch.nn.Module, config, parallel_state=None, *, cli: dict | None = None,
               async_save: bool = False) -> ZeroEngine:
    """Build a ZeroEngine. `config`: a path, a dict or a DeepSpeedConfig; `cli`: values for the keys it leaves
    out or sets to "auto" (an explicit JSON value must agree with them). Without `parallel_state`, the
    initialised megaengine.parallel state if any, else data parallel over all ranks (a world of one without
    torchrun)."""
    from megaengine import parallel
    if parallel_state is None and parallel.is_initialized():
        parallel_state = parallel.get_state()
    if parallel_state is None:
        parallel.init_distributed()
        groups = dict(dp_group=None, tp_group=None, pp_group=None)
        dp = dist.get_world_size()
    else:
        groups = dict(dp_group=parallel_state.dp_group, tp_group=parallel_state.tp_group,
                      pp_group=parallel_state.pp_group)
        dp = parallel_state.dp_size
    if not isinstance(config, DeepSpeedConfig):
        config = load_config(config, cli={**(cli or {}), "dp_size": dp})
    elif config.dp_size != dp:
        raise ConfigError(f"the DeepSpeedConfig was resolved for dp={config.dp_size} but this run has dp={dp}.")
    return ZeroEngine(model, config, async_save=async_save, **groups)
