"""`initialize(model, config)` -> ZeroEngine: DeepSpeed's training-engine interface over ZeroOptimizer.

    engine = megaengine.initialize(model=model, config="configs/zero/zero2.json", cli={"lr": 3e-4, ...})
    for batch in loader:                       # one micro-batch per call, as with DeepSpeed
        loss = engine(batch)
        engine.backward(loss)                  # divides by gradient_accumulation_steps, scales for fp16
        engine.step()                          # optimizer step only at accumulation boundaries
    engine.save_checkpoint("ckpt")             # per-rank files, then the `latest` pointer

The model is cast to bf16/fp16 when the config enables it (fp32 master weights live in the optimizer). LR
schedules (WarmupLR, WarmupDecayLR, WarmupCosineLR) follow DeepSpeed: the scheduler starts at iteration -1
and advances after each applied (not skipped) step.
"""
from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.distributed as dist

from megaengine.parallel import comm
from megaengine.parallel.mesh import ConfigError
from megaengine.zero.config import DeepSpeedConfig, SchedulerConfig, load_config
from megaengine.zero.loss_scale import DynamicLossScaler, StaticLossScaler
from megaengine.zero.optimizer import ZeroOptimizer

log = logging.getLogger("megaengine.zero")


def scheduler_lr(sched: SchedulerConfig, base_lr: float, iteration: int) -> float:
    """DeepSpeed's learning rate at `last_batch_iteration` = iteration (-1 before the first step)."""
    if sched.type is None:
        return base_lr
    p = sched.params
    warm = max(2, int(p.get("warmup_num_steps", 1000)))
    linear = p.get("warmup_type", "log") == "linear"

    def warm_gamma(it):
        return it / warm if linear else math.log(it + 1) / math.log(warm)

    if sched.type == "WarmupCosineLR":
        if iteration < 0:
            return 0.0
        if iteration < warm:
            low = float(p.get("warmup_min_ratio", 0.0))
            return base_lr * (low + warm_gamma(iteration) * (1 - low))
        total = int(p["total_num_steps"])
        progress = min(1.0, (iteration - warm + 1) / max(1, total - warm))
        low = float(p.get("cos_min_ratio", 0.0001))
        return base_lr * max(0.0, low + (1 - low) * (1 + math.cos(math.pi * progress)) / 2)
    low = float(p.get("warmup_min_lr", 0.0))
    high = float(p.get("warmup_max_lr", base_lr if sched.type == "WarmupLR" else 0.001))
    if iteration < 0:
        return low
    if iteration < warm:
        gamma = warm_gamma(iteration)
    elif sched.type == "WarmupDecayLR":
        total = int(p["total_num_steps"])
        gamma = max(0.0, (total - iteration) / max(1.0, total - warm))
    else:
        gamma = 1.0
    return low + (high - low) * gamma


def _loss_scaler(cfg: DeepSpeedConfig):
    if not cfg.fp16.enabled:
        return None
    f = cfg.fp16
    if f.loss_scale > 0:
        return StaticLossScaler(f.loss_scale)
    return DynamicLossScaler(f.initial_scale_power, f.loss_scale_window, f.hysteresis, f.min_loss_scale,
                             f.consecutive_hysteresis)


def optimizer_from_config(model_chunks, config: DeepSpeedConfig, *, dp_group=None, tp_group=None,
                          pp_group=None) -> ZeroOptimizer:
    """The ZeroOptimizer a DeepSpeed config describes (used by the engine and by pretrain_gpt.py)."""
    z, o = config.zero_optimization, config.optimizer
    return ZeroOptimizer(
        model_chunks, stage=z.stage, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
        adam_w_mode=o.adam_w_mode, clip_grad=config.gradient_clipping, dp_group=dp_group, tp_group=tp_group,
        pp_group=pp_group, reduce_bucket_size=z.reduce_bucket_size, overlap_comm=z.overlap_comm,
        reduce_scatter=z.reduce_scatter, prescale_gradients=config.prescale_gradients,
        loss_scaler=_loss_scaler(config), offload_optimizer=z.offload_optimizer == "cpu",
        prefetch_bucket_size=z.stage3_prefetch_bucket_size,
        param_persistence_threshold=z.stage3_param_persistence_threshold,
        max_live_parameters=z.stage3_max_live_parameters)


class ZeroEngine:
    def __init__(self, model: torch.nn.Module, config: DeepSpeedConfig, *, dp_group=None, tp_group=None,
                 pp_group=None):
        self.module, self.config = model, config
        if config.bf16:
            model.to(torch.bfloat16)
        elif config.fp16.enabled:
            model.to(torch.float16)
        self.optimizer = optimizer_from_config([model], config, dp_group=dp_group, tp_group=tp_group,
                                               pp_group=pp_group)
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
    def _rank_file(self, directory: str) -> str:
        return os.path.join(directory, f"rank{dist.get_rank():05d}.pt")

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None) -> str:
        """Each rank writes its own file (temp name, then rename); rank 0 writes `latest` after all are done."""
        tag = tag or f"global_step{self.global_steps}"
        directory = os.path.join(save_dir, tag)
        os.makedirs(directory, exist_ok=True)
        with self.optimizer.gathered_params():
            module = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        state = {"module": module, "optimizer": self.optimizer.state_dict(), "client_state": client_state or {},
                 "micro_steps": self.micro_steps, "global_steps": self.global_steps,
                 "skipped_steps": self.skipped_steps, "lr_iteration": self.lr_iteration}
        path = self._rank_file(directory)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        _barrier(self.optimizer.device)
        if dist.get_rank() == 0:
            latest = os.path.join(save_dir, "latest")
            with open(latest + ".tmp", "w") as f:
                f.write(tag)
            os.replace(latest + ".tmp", latest)
        _barrier(self.optimizer.device)
        return directory

    def load_checkpoint(self, load_dir: str, tag: str | None = None) -> tuple[str, dict]:
        if tag is None:
            latest = os.path.join(load_dir, "latest")
            if not os.path.exists(latest):
                raise ConfigError(f"no checkpoint in {load_dir!r}: the 'latest' file is missing.")
            with open(latest) as f:
                tag = f.read().strip()
        directory = os.path.join(load_dir, tag)
        path = self._rank_file(directory)
        if not os.path.exists(path):
            raise ConfigError(f"checkpoint {directory!r} has no file for rank {dist.get_rank()} ({path}); it was "
                              "saved with a different number of ranks.")
        state = torch.load(path, map_location="cpu", weights_only=False)
        with self.optimizer.gathered_params():
            self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])  # publishes the fp32 masters into the parameters
        for k in ("micro_steps", "global_steps", "skipped_steps", "lr_iteration"):
            setattr(self, k, state[k])
        return directory, state["client_state"]


def _barrier(device) -> None:
    comm.all_reduce(torch.zeros(1, device=device))


def initialize(model: torch.nn.Module, config, parallel_state=None, *, cli: dict | None = None) -> ZeroEngine:
    """Build a ZeroEngine. `config`: a path, a dict or a DeepSpeedConfig; `cli`: values for "auto" keys.
    Without `parallel_state`, the initialised megaengine.parallel state if any, else data parallel over all
    ranks (a world of one without torchrun)."""
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
    return ZeroEngine(model, config, **groups)
