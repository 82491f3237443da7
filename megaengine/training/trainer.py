"""The training loop behind pretrain_gpt.py: config -> mesh -> data -> model -> optimizer -> steps.

`main(argv)` is the entry point: it resolves the flags into a Config and turns every user mistake into one
message from rank 0 and a non-zero exit. `train(cfg)` is the loop, reading top to bottom; `train_step` does
one optimizer step's forward and backward over the iteration's micro-batches. The small helpers below it own
one decision each: the loss window, skipped steps, saving, the exit signal, evaluation, sampling.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megaengine import parallel
from megaengine.checkpoint import Checkpointer, Layout, latest_tag, load_buffers, named_buffers
from megaengine.config import Config, resolve, same_file
from megaengine.context_parallel import split_for_rank
from megaengine.data import MicroBatchLoader, Tokenizer, build_datasets, ensure_default_corpus
from megaengine.errors import ConfigError
from megaengine.fp8 import set_grad_divisor, update_amax_history
from megaengine.models import GPT, count_parameters
from megaengine.models.gpt import generate
from megaengine.moe import pop_moe_stats, set_aux_loss_scale
from megaengine.parallel import comm
from megaengine.parallel.mesh import reseed, rng_state, set_rng_state
from megaengine.pipeline import schedules
from megaengine.pipeline.executor import forward_only, run_pipeline
from megaengine.pipeline.partition import layer_ranges
from megaengine.tools.hf import ARCHITECTURE_KEYS, load_hf
from megaengine.training.lr_schedule import lr_schedule
from megaengine.training.metrics import ProgressLogger, device_peak_tflops, flops_per_token
from megaengine.zero.init import zero_init
from megaengine.zero.optimizer import ZeroOptimizer

SAMPLE_PROMPT = "def main("


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps); every rank raises it together."""


class PeerTimeout(RuntimeError):
    """A collective or p2p transfer gave up waiting for a peer; raised by the ranks that were left waiting."""


_PEER_FAILURES = ("timed out", "timeout", "connection closed", "connection reset", "nccl")


class Watch:
    """`with watch(phase, iteration):` names the rank, iteration and phase when a peer stops answering, instead
    of a bare backend error."""

    def __init__(self, state, minutes: float):
        self.state, self.minutes = state, minutes

    @contextlib.contextmanager
    def __call__(self, phase: str, iteration: int):
        try:
            yield
        except RuntimeError as e:
            if isinstance(e, PeerTimeout) or not any(w in str(e).lower() for w in _PEER_FAILURES):
                raise
            s = self.state
            raise PeerTimeout(
                f"rank {dist.get_rank()} (tp {s.tp_rank}, pp {s.pp_rank}, "
                f"{f'cp {s.cp_rank}, ' if s.cp_size > 1 else ''}dp {s.dp_rank}) gave up in {phase} of iteration "
                f"{iteration}: a peer did not answer within --distributed-timeout-minutes {self.minutes:g} (it is "
                f"stuck, slow or dead). Backend said: {str(e)[:300]}") from None


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        train(resolve(argv, world))
    except (ConfigError, TrainingStopped) as e:
        # Every rank reaches the same verdict from the same flags, files and reduced numbers; only rank 0 speaks.
        if rank == 0:
            print(f"megaengine: error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ConfigError) else 3
    except PeerTimeout as e:  # only the ranks left waiting know: each of them says so
        print(f"megaengine: error: {e}", file=sys.stderr, flush=True)
        return 4
    finally:
        parallel.destroy()
    return 0


def train(cfg: Config) -> None:
    state = initialize_mesh(cfg)
    say = print if dist.get_rank() == 0 else (lambda *a, **k: None)
    say(cfg.summary(), flush=True)
    data = build_data(cfg, state, say)
    chunks = build_model_chunks(cfg, state)
    if cfg.checkpoint.load_hf:
        load_hf_weights(chunks, cfg.checkpoint.load_hf, cfg.model)
    optimizer = build_optimizer(chunks, cfg, state)  # its fp32 masters start from the weights loaded above
    plan = plan_pipeline(cfg, state)
    loader = MicroBatchLoader(data.train, cfg.train.micro_batch_size, state.dp_rank, state.dp_size)
    checkpoints = TrainingCheckpoints(cfg, state, chunks, optimizer, loader, data.tokenizer.model_path)
    iteration = checkpoints.resume(say)
    logger, lr_at, window, skips = progress_logger(cfg, state, say), lr_schedule(cfg.optim), LossWindow(cfg, state), \
        SkipGuard(cfg)
    exit_signal, watch = ExitSignal(cfg.train.exit_signal_handler), Watch(state, cfg.parallel.timeout_minutes)
    for c in chunks:
        c.train()
    while iteration < cfg.train.train_iters:
        lr, start = lr_at(iteration), time.monotonic()
        with watch("forward, backward and gradient reduction", iteration + 1):
            batches = next_batches(loader, cfg.train.micro_batches(state.dp_size), state, cfg.model.vocab_size)
            loss = train_step(chunks, optimizer, batches, plan, state)
        with watch("the optimizer step", iteration + 1):
            grad_norm, skipped = optimizer.step(lr)
        iteration += 1
        window.add(loss, time.monotonic() - start, skipped)
        skips.record(skipped, iteration, grad_norm, optimizer.loss_scale, say)
        if window.due(iteration):
            with watch("loss logging", iteration):
                logger.log(iteration, lr=lr, grad_norm=grad_norm, **window.flush(),
                           extra=moe_metrics(chunks, cfg, state))
        skips.stop_if_too_many(iteration)
        if evaluation_due(cfg, iteration) and data.valid is not None:
            with watch("evaluation", iteration):
                logger.log_eval(iteration, evaluate(chunks, data.valid, cfg, state, plan))
        with watch("the exit-signal check", iteration):
            exiting = exit_signal.any_rank(state.device) or exit_interval_reached(cfg, iteration, say)
        if save_due(cfg, iteration, exiting, skips.consecutive):
            with watch("the checkpoint save", iteration):
                checkpoints.save(iteration)
        if exiting:
            break
    logger.close()
    if not exit_signal.received:  # (stage 3 gathers each module's parameters around its forward, as in training)
        sample_text(chunks, data.tokenizer, cfg, state, say)
    checkpoints.wait()  # the last background save completes before the process group goes away


# ---- building the run --------------------------------------------------------------------------------------

@dataclass
class Data:
    tokenizer: Tokenizer
    train: object
    valid: object | None


def build_data(cfg: Config, state, say=print) -> Data:
    d, t = cfg.data, cfg.train
    if d.data_path:
        data_path, tokenizer_path = list(d.data_path), d.tokenizer_model
    else:
        prefix, tokenizer_path = ensure_default_corpus(cache_dir=d.cache_dir, vocab_size=d.vocab_size, say=say)
        data_path = [prefix]
    tokenizer = Tokenizer(tokenizer_path)
    hf_dir = cfg.checkpoint.load_hf
    if hf_dir and not d.data_path and os.path.exists(os.path.join(hf_dir, "tokenizer.model")) and not same_file(
            os.path.join(hf_dir, "tokenizer.model"), tokenizer_path):
        raise ConfigError(f"--load-hf {hf_dir} brings its own tokenizer, not the embedded corpus's "
                          f"({tokenizer_path}): its ids would mean other text. Encode data with "
                          f"{os.path.join(hf_dir, 'tokenizer.model')} (python -m megaengine.data.preprocess) and "
                          "pass it as --data-path.")
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens, the model was "
                          f"configured for {cfg.model.vocab_size}.")
    glob, evals = t.global_batch_size, cfg.logging.eval_iters
    eval_samples = (t.train_iters // cfg.logging.eval_interval + 1) * evals * glob
    train_set, valid, _ = build_datasets(data_path, d.split, cfg.model.seq_length, t.seed,
                                         num_samples=(t.train_iters * glob, eval_samples, evals * glob))
    if train_set is None:
        raise ConfigError(f"--split {d.split} leaves no training data.")
    if d.data_path:
        check_token_range(train_set, tokenizer.vocab_size, d.tokenizer_model)
    return Data(tokenizer, train_set, valid)


def check_token_range(dataset, vocab_size: int, tokenizer_model: str) -> None:
    """Data encoded with a larger vocabulary than the model's would index past the embedding."""
    n = min(len(dataset), 64)
    top = max(int(np.max(dataset[i])) for i in range(n)) if n else -1
    if top >= vocab_size:
        raise ConfigError(f"--data-path holds token id {top} but the tokenizer ({tokenizer_model}) has only "
                          f"{vocab_size} tokens: the data was encoded with another tokenizer.")


def load_hf_weights(chunks, path: str, config) -> None:
    """--load-hf: continued pretraining from a Hugging Face GPT-2 or LLaMA directory. The architecture flags
    must describe the same model; each rank keeps only its shard."""
    hf_config, full = load_hf(path, base=config)
    diff = [f"{k}: flags {getattr(config, k)!r}, checkpoint {getattr(hf_config, k)!r}" for k in ARCHITECTURE_KEYS
            if getattr(config, k) != getattr(hf_config, k)]
    if diff:
        raise ConfigError(f"--load-hf {path} holds another architecture than the flags describe: {'; '.join(diff)}.")
    for chunk in chunks:
        chunk.load_full_state(full)


def build_model_chunks(cfg: Config, state) -> list:
    """This rank's model chunks: one GPT per virtual pipeline stage, chunk c holding virtual stage c*pp + r."""
    v, pp, r = cfg.parallel.virtual_stages, state.pp_size, state.pp_rank
    ranges = layer_ranges(cfg.model.num_layers, pp, v)[r]
    with sharded_build(cfg, state):
        chunks = [GPT(cfg.model, state.tp_group, cp_group=state.cp_group, cp_comm_type=cfg.parallel.cp_comm_type,
                      layers=ranges[c], pre_process=(r == 0 and c == 0), post_process=(r == pp - 1 and c == v - 1),
                      ep_group=state.ep_group) for c in range(v)]
    set_grad_divisor(chunks, state.dp_cp_size)  # FP8 histories in the global batch's units: the same at any dp
    return [c.to(device=state.device, dtype=cfg.train.param_dtype) for c in chunks]


def sharded_build(cfg: Config, state):
    """ZeRO-3 builds the model sharded, module by module (megaengine.zero_init): no rank holds it whole. Not
    when Hugging Face weights are loaded into it (they arrive whole anyway). The GPT's seeded init draws the
    same numbers on every rank, so nothing is broadcast."""
    z = cfg.optim.zero
    return zero_init(state.dp_cp_group, dtype=cfg.train.param_dtype, device=state.device,
                     param_persistence_threshold=z.stage3_param_persistence_threshold, broadcast=False,
                     enabled=z.stage == 3 and not cfg.checkpoint.load_hf)


def build_optimizer(chunks, cfg: Config, state) -> ZeroOptimizer:
    # Weights are replicated over dp and cp: gradients are reduced, and ZeRO shards, over both; MoE experts only
    # over the ranks holding the same experts.
    opt = ZeroOptimizer.from_config(chunks, cfg.optim, dp_group=state.dp_cp_group, tp_group=state.tp_group,
                                    pp_group=state.pp_group, expert_dp_group=state.expert_dp_group,
                                    ep_group=state.ep_group)
    for chunk in chunks:  # ZeRO-3: the tied head reads the embedding outside its module, so gather it there too
        if chunk.pre_process and chunk.post_process and not cfg.model.untie_embeddings_and_output_weights:
            opt.register_external_parameter(chunk, chunk.word_embeddings.weight)
    return opt


@dataclass
class PipelinePlan:
    """This rank's action list and what the executor needs to size its receive buffers."""
    actions: list
    tensor_shape: tuple
    dtype: torch.dtype
    timeout_s: float


def plan_pipeline(cfg: Config, state) -> PipelinePlan | None:
    if state.pp_size == 1:
        return None
    p, m = cfg.parallel, cfg.model
    actions = schedules.build(p.schedule, p.pp, cfg.train.micro_batches(state.dp_size), p.virtual_stages)[state.pp_rank]
    seq = m.seq_length // state.cp_size  # this rank's share of each sequence (context parallel)
    seq = seq // state.tp_size if m.sequence_parallel else seq
    return PipelinePlan(actions, (seq, cfg.train.micro_batch_size, m.hidden_size), cfg.train.param_dtype,
                        60.0 * p.timeout_minutes)


def initialize_mesh(cfg: Config):
    p = cfg.parallel
    return parallel.initialize(p.tp, p.pp, cp=p.cp, ep=p.ep, backend=p.backend, seed=cfg.train.seed,
                               timeout_minutes=p.timeout_minutes)


def progress_logger(cfg: Config, state, say) -> ProgressLogger:
    counts = count_parameters(cfg.model, state.tp_size)
    active = f" ({counts['active'] / 1e6:.2f}M active per token)" if cfg.model.moe else ""
    extra = "".join(f" {name} {size}" for name, size in (("cp", state.cp_size), ("ep", state.ep_size)) if size > 1)
    say(f"megaengine: {counts['total'] / 1e6:.2f}M parameters{active} | tp {state.tp_size} pp {state.pp_size} "
        f"dp {state.dp_size}{extra} | {state.device}", flush=True)
    tokens_per_iter = cfg.train.global_batch_size * cfg.model.seq_length
    return ProgressLogger(total_iters=cfg.train.train_iters, tokens_per_iter=tokens_per_iter,
                          flops_per_iter=tokens_per_iter * flops_per_token(cfg.model, counts["matmul"]),
                          world_size=dist.get_world_size(), peak_tflops=device_peak_tflops(cfg.logging.peak_tflops),
                          metrics_file=cfg.logging.metrics_file, tensorboard_dir=cfg.logging.tensorboard_dir,
                          is_writer=dist.get_rank() == 0)


# ---- one step ------------------------------------------------------------------------------------------------

def next_batches(loader, n: int, state, vocab_size: int | None = None) -> list:
    """The next n micro-batches of (tokens, labels) on the device: every cp rank of a dp rank reads the same
    samples and keeps its share of each sequence."""
    batches = []
    for _ in range(n):
        tokens, labels = (split_for_rank(t, state.cp_size, state.cp_rank) for t in loader.next_microbatch())
        # The vocab-parallel embedding would silently zero an id outside every rank's range: refuse it
        # (checked on the CPU copy, so no device sync).
        top = max(int(tokens.max()), int(labels.max()))
        if vocab_size is not None and top >= vocab_size:
            raise RuntimeError(f"token id {top} in the training data is outside the tokenizer's "
                               f"vocabulary of {vocab_size}: the data was encoded with another tokenizer.")
        batches.append((tokens.to(state.device), labels.to(state.device)))
    return batches


def train_step(chunks, optimizer, batches, plan: PipelinePlan | None, state) -> torch.Tensor:
    """Forward and backward over the iteration's micro-batches, gradients reduced and ready for step(), FP8
    scales updated for the next step. Returns this rank's share of the iteration's mean loss (zero on pipeline
    stages without the loss)."""
    total = forward_backward(chunks, optimizer, batches, plan, state)
    update_fp8_scales(chunks, state)
    return total


def update_fp8_scales(chunks, state) -> None:
    """FP8 delayed scaling: the step's amaxes, MAX-reduced over tp and the weight replicas (dp x cp: the amaxes of
    the whole global batch, so every layout agrees), enter the histories that scale the next step. Collective;
    nothing to do without delayed-scaling layers."""
    update_amax_history(chunks, groups=(state.tp_group, state.dp_cp_group))


def forward_backward(chunks, optimizer, batches, plan: PipelinePlan | None, state) -> torch.Tensor:
    """The micro-batches through one stage, or through the pipeline schedule; gradients reduced."""
    optimizer.zero_grad()
    n = len(batches)
    scale_aux_losses(chunks, optimizer, n)
    total = torch.zeros((), device=state.device)
    if plan is None:
        model = chunks[0]
        for i, (tokens, labels) in enumerate(batches):
            optimizer.set_is_last_microbatch(i == n - 1)  # its backward overlaps with the dp reduction
            loss = model(tokens, labels).float().mean() / n
            optimizer.scale_loss(loss).backward()
            total += loss.detach()
        return total

    def forward_step(chunk_index, module, x, mb):
        tokens, labels = batches[mb]
        out = module(tokens if module.pre_process else x, labels if module.post_process else None)
        if not module.post_process:
            return out
        loss = out.float().mean() / n
        total.add_(loss.detach())
        return optimizer.scale_loss(loss)

    # Gradients finish at different times on different stages: reduce them all after the last backward.
    optimizer.set_is_last_microbatch(False)
    run_pipeline(plan.actions, chunks, pp_group=state.pp_group, forward_step=forward_step, num_microbatches=n,
                 tensor_shape=plan.tensor_shape, dtype=plan.dtype, device=state.device, timeout=plan.timeout_s,
                 prefetch=optimizer.prefetch)
    optimizer.finish_grad_sync()
    optimizer.sync_tied_grads(state.embedding_group)
    return total


def scale_aux_losses(chunks, optimizer, num_microbatches: int) -> None:
    """MoE layers seed their auxiliary losses' gradient in backward: it must be what the main loss is multiplied
    by (the loss scale over the micro-batches), which can change every step under fp16."""
    for chunk in chunks:
        set_aux_loss_scale(chunk, optimizer.loss_scale / num_microbatches)


def moe_metrics(chunks, cfg: Config, state) -> dict:
    """The MoE layers' statistics since the last call (each a mean over micro-batches), averaged over the layers
    and the dp ranks: {"load_balancing_loss", "z_loss", "dropped_fraction"}, those that are on, coefficients not
    applied (as Megatron logs them). Collective; {} for a dense model."""
    moe = cfg.model.moe
    names = [] if moe is None else [
        name for name, on in (("load_balancing_loss", moe.moe_aux_loss_coeff > 0), ("z_loss", moe.moe_z_loss_coeff > 0),
                              ("dropped_fraction", moe.moe_expert_capacity_factor is not None)) if on]
    if not names:
        return {}
    t = torch.zeros(len(names) + 1, device=state.device)  # the statistics' sums over layers, the number of layers
    for chunk in chunks:
        stats, layers = pop_moe_stats(chunk)
        for i, name in enumerate(names):
            t[i] += stats.get(name, 0.0)
        t[-1] += layers
    if cfg.model.sequence_parallel:  # each tp rank holds its sequence shard's share
        comm.all_reduce(t[:-1], state.tp_group)
    comm.all_reduce(t, state.pp_group)
    comm.all_reduce(t[:-1], state.dp_cp_group)
    return dict(zip(names, (t[:-1] / (t[-1].clamp_min(1) * state.dp_cp_size)).tolist()))


def reduce_loss(total: torch.Tensor, state) -> float:
    """The mean of per-rank mean losses over dp and cp (cp ranks hold equal parts of each sequence), summed over
    pp where only the last stage holds it (zeros elsewhere). Collective."""
    comm.all_reduce(total, state.dp_cp_group)
    comm.all_reduce(total, state.pp_group)
    return total.item() / state.dp_cp_size


# ---- the loop's helpers ------------------------------------------------------------------------------------

class LossWindow:
    """The loss, time and skipped steps since the last progress line; one line every --log-interval."""

    def __init__(self, cfg: Config, state):
        self.interval, self.last, self.state = cfg.logging.log_interval, cfg.train.train_iters, state
        self.loss, self.steps, self.seconds, self.skipped = torch.zeros((), device=state.device), 0, 0.0, 0

    def add(self, loss: torch.Tensor, seconds: float, skipped: bool) -> None:
        self.loss += loss
        self.steps += 1
        self.seconds += seconds
        self.skipped += int(skipped)  # cumulative over the run, as Megatron logs it

    def due(self, iteration: int) -> bool:
        return iteration % self.interval == 0 or iteration == self.last

    def flush(self) -> dict:
        """Collective: the window's mean loss over dp (and pp), then a fresh window."""
        out = {"loss": reduce_loss(self.loss, self.state) / self.steps, "iter_seconds": self.seconds / self.steps,
               "skipped": self.skipped}
        self.loss.zero_()
        self.steps, self.seconds = 0, 0.0
        return out


class SkipGuard:
    """Counts consecutive steps skipped for inf/nan gradients and stops the run after --max-skipped-steps."""

    def __init__(self, cfg: Config):
        self.limit, self.save = cfg.train.max_skipped_steps, cfg.checkpoint.save
        self.consecutive = 0

    def record(self, skipped: bool, iteration: int, grad_norm, loss_scale: float, say) -> None:
        self.consecutive = self.consecutive + 1 if skipped else 0
        if skipped:
            say(f"iteration {iteration}: step skipped, non-finite gradients (grad norm {grad_norm}, loss scale "
                f"{loss_scale:g})", flush=True)

    def stop_if_too_many(self, iteration: int) -> None:
        if self.consecutive >= self.limit:
            raise TrainingStopped(
                f"{self.consecutive} consecutive steps skipped for inf/nan gradients (--max-skipped-steps "
                f"{self.limit}) at iteration {iteration}. The last checkpoint ({self.save or 'none: no --save'}) is "
                "untouched; lower --lr or check the data, then resume.")


def evaluation_due(cfg: Config, iteration: int) -> bool:
    return cfg.logging.eval_iters > 0 and (iteration % cfg.logging.eval_interval == 0
                                           or iteration == cfg.train.train_iters)


def exit_interval_reached(cfg: Config, iteration: int, say) -> bool:
    if not (cfg.train.exit_interval and iteration % cfg.train.exit_interval == 0):
        return False
    say(f"exiting at iteration {iteration} (--exit-interval {cfg.train.exit_interval})", flush=True)
    return True


def save_due(cfg: Config, iteration: int, exiting: bool, consecutive_skips: int) -> bool:
    """At --save-interval, at the end and when exiting; never inside a run of skipped steps, so the newest
    checkpoint stays the last good one."""
    c = cfg.checkpoint
    return bool(c.save) and consecutive_skips == 0 and (
        bool(c.save_interval and iteration % c.save_interval == 0) or iteration == cfg.train.train_iters or exiting)


class ExitSignal:
    """SIGTERM (SLURM's warning before preemption) sets a flag; the loop agrees on it across ranks once per
    iteration, saves and exits cleanly. Megatron's --exit-signal-handler."""

    def __init__(self, enabled: bool):
        self.enabled, self.received = enabled, False
        if enabled:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.received = True

    def any_rank(self, device) -> bool:
        if not self.enabled:
            return False
        flag = torch.tensor([float(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.received = bool(flag.item())
        if self.received and dist.get_rank() == 0:
            print("SIGTERM received: saving and exiting", flush=True)
        return self.received


class TrainingCheckpoints:
    """pretrain_gpt.py's use of the Checkpointer: the model, optimizer, data position and RNG, with the config
    and tokenizer recorded beside them."""

    def __init__(self, cfg: Config, state, chunks, optimizer, loader, tokenizer_model: str):
        self.cfg, self.state, self.chunks, self.optimizer, self.loader = cfg, state, chunks, optimizer, loader
        self.tokenizer_model = os.path.abspath(tokenizer_model)
        self.checkpointer = Checkpointer(async_save=cfg.checkpoint.async_save, retain=cfg.checkpoint.save_retain)
        self.layout = Layout(tp=state.tp_size, pp=state.pp_size, dp=state.dp_size, cp=state.cp_size, ep=state.ep_size,
                             virtual_stages=len(chunks), zero_stage=optimizer.stage, tp_rank=state.tp_rank,
                             replica=state.dp_cp_rank, ep_rank=state.ep_rank, expert_replica=state.expert_dp_rank)

    def named_params(self) -> list:
        return [(chunk.global_name(name), p) for chunk in self.chunks for name, p in chunk.named_parameters()]

    def named_buffers(self) -> list:  # FP8 amax histories and scales
        return [pair for chunk in self.chunks for pair in named_buffers(chunk, chunk.global_name)]

    def save(self, iteration: int) -> None:
        meta = {"iteration": iteration, "consumed_samples": self.loader.consumed_samples,
                "model": self.cfg.model.to_dict(), "config": self.cfg.to_dict(),
                "tokenizer_model": self.tokenizer_model}
        rank_state = {"rng": rng_state(), "loader": self.loader.state_dict(), "iteration": iteration}
        self.checkpointer.save(self.cfg.checkpoint.save, iteration, named_params=self.named_params(),
                               optimizer=self.optimizer, layout=self.layout, meta=meta, rank_state=rank_state,
                               buffers=self.named_buffers())

    def resume_root(self) -> str | None:
        """--load, or --save when it already holds a checkpoint (a restarted job picks up where it died)."""
        c = self.cfg.checkpoint
        if c.load:
            return c.load
        return c.save if c.save and latest_tag(c.save) is not None else None

    def resume(self, say) -> int:
        """The iteration to continue from (0 without a checkpoint), everything restored at this layout."""
        root = self.resume_root()
        if root is None:
            return 0
        loaded = self.checkpointer.load(root, named_params=self.named_params(), optimizer=self.optimizer,
                                        layout=self.layout, check=self._same_model,
                                        buffers=[name for name, _ in self.named_buffers()])
        for chunk in self.chunks:  # a checkpoint without FP8 state (or of another recipe) leaves it fresh
            load_buffers(chunk, loaded.buffers, chunk.global_name)
        iteration = int(loaded.meta["iteration"])
        self.loader.load_state_dict({"consumed_samples": loaded.meta["consumed_samples"]})
        if loaded.rank_state is not None:
            set_rng_state(loaded.rank_state["rng"])
        else:  # at another layout saved streams do not map onto ranks: start fresh ones
            reseed(self.cfg.train.seed + iteration, self.state)
        saved, now = loaded.meta.get("layout", {}), self.layout
        say(f"resumed from {loaded.path} at iteration {iteration} (saved at tp {saved.get('tp')} pp {saved.get('pp')} "
            f"cp {saved.get('cp', 1)} dp {saved.get('dp')} ZeRO {saved.get('zero_stage')}; now tp {now.tp} pp {now.pp} "
            f"cp {now.cp} dp {now.dp} ZeRO {now.zero_stage})", flush=True)
        return iteration

    def _same_model(self, meta: dict, path: str) -> None:
        keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                "ffn_hidden_size", "vocab_size", "seq_length", "normalization", "position_embedding_type", "swiglu",
                "add_bias_linear", "untie_embeddings_and_output_weights")
        saved, now = meta.get("model", {}), self.cfg.model.to_dict()
        diff = [f"{k}: saved {saved.get(k)}, now {now.get(k)}" for k in keys if saved.get(k) != now.get(k)]
        moe_keys = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq")
        saved_moe, now_moe = saved.get("moe") or {}, now.get("moe") or {}

        def plain(v):  # the JSON file holds lists where the config holds tuples
            return list(v) if isinstance(v, tuple) else v
        diff += [f"{k}: saved {saved_moe.get(k)}, now {now_moe.get(k)}" for k in moe_keys
                 if plain(saved_moe.get(k)) != plain(now_moe.get(k))]
        if diff:
            raise ConfigError(f"{path}: checkpoint is of another model shape ({'; '.join(diff)}).")

    def wait(self) -> None:
        self.checkpointer.wait()


# ---- evaluation and sampling ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(chunks, dataset, cfg: Config, state, plan: PipelinePlan | None) -> float:
    for c in chunks:
        c.eval()
    loader = MicroBatchLoader(dataset, cfg.train.micro_batch_size, state.dp_rank, state.dp_size)
    total = torch.zeros((), device=state.device)
    steps = cfg.logging.eval_iters * cfg.train.micro_batches(state.dp_size)
    for tokens, labels in next_batches(loader, steps, state):
        if plan is None:
            total += chunks[0](tokens, labels).float().mean()
            continue
        out = forward_only(chunks, pp_group=state.pp_group, tensor_shape=plan.tensor_shape, dtype=plan.dtype,
                           device=state.device,
                           forward_step=lambda c, m, x: m(tokens if m.pre_process else x,
                                                          labels if m.post_process else None))
        if out is not None:
            total += out.float().mean()
    for c in chunks:
        c.train()
    return reduce_loss(total, state) / steps


@torch.no_grad()
def sample_text(chunks, tokenizer, cfg: Config, state, say) -> None:
    """A continuation of SAMPLE_PROMPT through the whole pipeline: the last stage samples each token
    (models.gpt.generate) and broadcasts it to the other stages. Context-parallel ranks hold the same weights:
    each runs the whole (short) context itself."""
    if cfg.logging.sample_tokens <= 0:
        return
    m = cfg.model
    sp = state.tp_size if m.sequence_parallel else 1

    def last_logits(context):
        hidden = forward_only(chunks, pp_group=state.pp_group, tensor_shape=(context.shape[1] // sp, 1, m.hidden_size),
                              dtype=cfg.train.param_dtype, device=state.device,
                              forward_step=lambda c, module, x: module(context if module.pre_process else x,
                                                                       whole_sequence=True))
        if hidden is None:
            return None
        return comm.gather_from_tp_region(hidden, state.tp_group, dim=-1)[-1, :, :m.vocab_size]

    def share(token):
        if state.pp_size > 1:
            comm.broadcast(token, state.pp_global_rank(state.pp_size - 1), state.pp_group)

    prompt = [tokenizer.eod] + tokenizer.encode(SAMPLE_PROMPT)  # a document's start, as training saw it
    for c in chunks:
        c.eval()
    ids = generate(last_logits, torch.tensor([prompt], device=state.device), cfg.logging.sample_tokens,
                   seq_length=m.seq_length, multiple_of=sp, share=share,
                   generator=torch.Generator(device=state.device).manual_seed(cfg.train.seed))
    for c in chunks:
        c.train()
    say(f"sample (prompt {SAMPLE_PROMPT!r}, {cfg.logging.sample_tokens} tokens):\n"
        f"{SAMPLE_PROMPT}{tokenizer.decode(ids[0, len(prompt):].tolist())}", flush=True)
