"""The training loop behind pretrain_gpt.py: flags -> mesh -> data -> model -> optimizer -> steps.

`main(argv)` is the entry point: it turns every user mistake into one message from rank 0 and a non-zero
exit. `train(args)` runs the loop; `train_step` does one optimizer step over the iteration's micro-batches.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megaengine import parallel
from megaengine.parallel import ConfigError, comm
from megaengine.training import checkpoint
from megaengine.training.args import model_config, parse_args, pipeline_schedule, validate, virtual_stages
from megaengine.training.lr_schedule import learning_rate
from megaengine.training.metrics import ProgressLogger, device_peak_tflops, flops_per_token


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps); every rank raises it together."""


class PeerTimeout(RuntimeError):
    """A collective or p2p transfer gave up waiting for a peer; raised by the ranks that were left waiting."""


_PEER_FAILURES = ("timed out", "timeout", "connection closed", "connection reset", "nccl")


@contextlib.contextmanager
def watch(phase: str, iteration: int, state, minutes: float):
    """Name the rank, iteration and phase when a peer stops answering, instead of a bare backend error."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, PeerTimeout) or not any(w in str(e).lower() for w in _PEER_FAILURES):
            raise
        raise PeerTimeout(
            f"rank {dist.get_rank()} (tp {state.tp_rank}, pp {state.pp_rank}, dp {state.dp_rank}) gave up in "
            f"{phase} of iteration {iteration}: a peer did not answer within --distributed-timeout-minutes "
            f"{minutes:g} (it is stuck, slow or dead). Backend said: {str(e)[:300]}") from None


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = parse_args(argv)
        validate(args, world)
        train(args)
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


class ExitSignal:
    """SIGTERM (SLURM's warning before preemption) sets a flag; the loop agrees on it across ranks once per
    iteration, saves and exits cleanly. Megatron's --exit-signal-handler."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            import signal
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.received = True

    def any_rank(self, device) -> bool:
        flag = torch.tensor([float(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class Data:
    tokenizer: object
    train: object
    valid: object | None


def build_data(args, state) -> Data:
    from megaengine.data import Tokenizer, build_datasets, ensure_default_corpus
    if args.data_path:
        data_path, tokenizer_path = args.data_path, args.tokenizer_model
    else:
        prefix, tokenizer_path = ensure_default_corpus(cache_dir=args.data_cache_dir, vocab_size=args.vocab_size)
        data_path = [prefix]
    tokenizer = Tokenizer(tokenizer_path)
    glob = args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters * glob
    train, valid, _ = build_datasets(data_path, args.split, args.seq_length, args.seed,
                                     num_samples=(args.train_iters * glob, evals, args.eval_iters * glob))
    if train is None:
        raise ConfigError(f"--split {args.split} leaves no training data.")
    return Data(tokenizer, train, valid)


def check_token_range(dataset, vocab_size: int, args) -> None:
    """Data encoded with a larger vocabulary than the model's would index past the embedding."""
    n = min(len(dataset), 64)
    top = max(int(np.max(dataset[i])) for i in range(n)) if n else -1
    if top >= vocab_size:
        raise ConfigError(f"--data-path holds token id {top} but the tokenizer ({args.tokenizer_model}) has only "
                          f"{vocab_size} tokens: the data was encoded with another tokenizer.")


def load_hf_weights(chunks, path: str, config) -> None:
    """--load-hf: continued pretraining from a Hugging Face GPT-2 or LLaMA directory. The architecture flags
    must describe the same model; each rank keeps only its shard."""
    from megaengine.tools.hf import ARCHITECTURE_KEYS, load_hf
    hf_config, full = load_hf(path, base=config)
    diff = [f"{k}: flags {getattr(config, k)!r}, checkpoint {getattr(hf_config, k)!r}" for k in ARCHITECTURE_KEYS
            if getattr(config, k) != getattr(hf_config, k)]
    if diff:
        raise ConfigError(f"--load-hf {path} holds another architecture than the flags describe: {'; '.join(diff)}.")
    for chunk in chunks:
        chunk.load_full_state(full)


def param_dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def build_optimizer(model_chunks, args, state):
    """From --zero-config (DeepSpeed JSON) if given, else plain data parallel (stage 0) or Megatron's
    distributed optimizer (ZeRO-1, --use-distributed-optimizer) from the flags."""
    from megaengine.zero.optimizer import ZeroOptimizer
    zero = getattr(args, "zero", None)
    if zero is not None:
        from megaengine.zero.engine import optimizer_from_config
        opt = optimizer_from_config(model_chunks, zero, dp_group=state.dp_group, tp_group=state.tp_group,
                                    pp_group=state.pp_group)
        if opt.stage == 3:  # the tied head reads the embedding outside its module: gather it there too
            for chunk in model_chunks:
                if chunk.pre_process and chunk.post_process and not chunk.config.untie_embeddings_and_output_weights:
                    opt.register_external_parameter(chunk, chunk.word_embeddings.weight)
        return opt
    return ZeroOptimizer(
        model_chunks, stage=1 if args.use_distributed_optimizer else 0, lr=args.lr,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, dp_group=state.dp_group, tp_group=state.tp_group, pp_group=state.pp_group,
        reduce_bucket_size=args.ddp_bucket_size, overlap_comm=args.overlap_grad_reduce)


def build_model_chunks(config, state, args) -> list:
    """This rank's model chunks: one GPT per virtual pipeline stage, chunk c holding virtual stage c*pp + r."""
    from megaengine.models import GPT
    from megaengine.pipeline.partition import layer_ranges
    v, pp, r = virtual_stages(args), state.pp_size, state.pp_rank
    ranges = layer_ranges(config.num_layers, pp, v)[r]
    chunks = [GPT(config, state.tp_group, layers=ranges[c], pre_process=(r == 0 and c == 0),
                  post_process=(r == pp - 1 and c == v - 1)) for c in range(v)]
    return [c.to(device=state.device, dtype=param_dtype(args)) for c in chunks]


@dataclass
class PipelinePlan:
    """This rank's action list and what the executor needs to size its receive buffers."""
    actions: list
    tensor_shape: tuple
    dtype: torch.dtype
    timeout_s: float


def plan_pipeline(args, state, config, num_micro: int) -> PipelinePlan | None:
    if state.pp_size == 1:
        return None
    from megaengine.pipeline import schedules
    actions = schedules.build(pipeline_schedule(args), state.pp_size, num_micro, virtual_stages(args))[state.pp_rank]
    seq = config.seq_length // state.tp_size if config.sequence_parallel else config.seq_length
    return PipelinePlan(actions, (seq, args.micro_batch_size, config.hidden_size), param_dtype(args),
                        60.0 * args.distributed_timeout_minutes)


def next_batches(loader, n: int, device, vocab_size: int | None = None) -> list:
    batches = []
    for _ in range(n):
        tokens, labels = loader.next_microbatch()
        # The vocab-parallel embedding would silently zero an id outside every rank's range: refuse it
        # (checked on the CPU copy, so no device sync).
        top = max(int(tokens.max()), int(labels.max()))
        if vocab_size is not None and top >= vocab_size:
            raise RuntimeError(f"token id {top} in the training data is outside the tokenizer's "
                               f"vocabulary of {vocab_size}: the data was encoded with another tokenizer.")
        batches.append((tokens.to(device), labels.to(device)))
    return batches


def train_step(chunks, optimizer, batches, plan: PipelinePlan | None, state) -> torch.Tensor:
    """Forward and backward over the iteration's micro-batches, gradients reduced and ready for step().
    Returns this rank's share of the iteration's mean loss (zero on pipeline stages without the loss)."""
    optimizer.zero_grad()
    n = len(batches)
    total = torch.zeros((), device=state.device)
    if plan is None:
        model = chunks[0]
        for i, (tokens, labels) in enumerate(batches):
            optimizer.set_is_last_microbatch(i == n - 1)  # its backward overlaps with the dp reduction
            loss = model(tokens, labels).float().mean() / n
            optimizer.scale_loss(loss).backward()
            total += loss.detach()
        return total

    from megaengine.pipeline.executor import run_pipeline

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
                 tensor_shape=plan.tensor_shape, dtype=plan.dtype, device=state.device, timeout=plan.timeout_s)
    optimizer.finish_grad_sync()
    sync_tied_embeddings(chunks, optimizer, state)
    return total


def sync_tied_embeddings(chunks, optimizer, state) -> None:
    """First and last stage each hold the tied word embedding: sum their gradients so both copies take the
    same step and never drift (Megatron's embedding group)."""
    if state.embedding_group is None:
        return
    for chunk in chunks:
        for p in chunk.parameters():
            if getattr(p, "shared_embedding", False) or getattr(p, "shared_embedding_copy", False):
                comm.all_reduce(optimizer.main_grad(p), state.embedding_group)


@torch.no_grad()
def evaluate(chunks, dataset, args, state, plan: PipelinePlan | None) -> float:
    from megaengine.data import MicroBatchLoader
    from megaengine.pipeline.executor import forward_only
    for c in chunks:
        c.eval()
    loader = MicroBatchLoader(dataset, args.micro_batch_size, state.dp_rank, state.dp_size)
    total = torch.zeros((), device=state.device)
    steps = args.eval_iters * (args.global_batch_size // (args.micro_batch_size * state.dp_size))
    for tokens, labels in next_batches(loader, steps, state.device):
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
    reduce_loss(total, state)
    return total.item() / (steps * state.dp_size)


def reduce_loss(total: torch.Tensor, state) -> None:
    """Sum a loss over dp, and over pp where only the last stage holds it (zeros elsewhere)."""
    comm.all_reduce(total, state.dp_group)
    comm.all_reduce(total, state.pp_group)


def resume_from(args) -> str | None:
    """--load, or --save when it already holds a checkpoint (a restarted job picks up where it died)."""
    if args.load:
        return args.load
    if args.save and checkpoint.latest_iteration(args.save) is not None:
        return args.save
    return None


@torch.no_grad()
def sample_text(chunks, tokenizer, args, state, config) -> None:
    """Sample a continuation of a prompt; with pp > 1 each token goes through the pipeline and the last stage
    broadcasts it to the others."""
    if args.sample_tokens <= 0:
        return
    from megaengine.pipeline.executor import forward_only
    prompt = "def main("
    ids = torch.tensor([[tokenizer.bos] + tokenizer.encode(prompt)], device=state.device)
    g = torch.Generator(device=state.device).manual_seed(args.seed)
    for c in chunks:
        c.eval()
    for _ in range(args.sample_tokens):
        context = ids[:, -config.seq_length:]
        if config.sequence_parallel:  # sequence shards must divide evenly
            context = context[:, context.shape[1] % state.tp_size:]
        seq = context.shape[1] // (state.tp_size if config.sequence_parallel else 1)
        hidden = forward_only(chunks, pp_group=state.pp_group, tensor_shape=(seq, 1, config.hidden_size),
                              dtype=param_dtype(args), device=state.device,
                              forward_step=lambda c, m, x: m(context if m.pre_process else x))
        token = torch.zeros((1, 1), dtype=torch.long, device=state.device)
        if hidden is not None:
            logits = comm.gather_from_tp_region(hidden, state.tp_group, dim=-1)[-1, :, :config.vocab_size]
            probs = (logits.float() / 0.8).softmax(-1)
            token = torch.multinomial(probs, 1, generator=g)
        if state.pp_size > 1:
            comm.broadcast(token, state.pp_global_rank(state.pp_size - 1), state.pp_group)
        ids = torch.cat([ids, token], dim=1)
    for c in chunks:
        c.train()
    if dist.get_rank() == 0:
        print("sample:\n" + prompt + tokenizer.decode(ids[0, len(tokenizer.encode(prompt)) + 1:].tolist()), flush=True)


def train(args) -> None:
    state = parallel.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                backend=args.distributed_backend, seed=args.seed,
                                timeout_minutes=args.distributed_timeout_minutes)
    is_rank0 = dist.get_rank() == 0
    data = build_data(args, state)
    if args.data_path:
        check_token_range(data.train, data.tokenizer.vocab_size, args)
    config = model_config(args, data.tokenizer.vocab_size)
    chunks = build_model_chunks(config, state, args)
    if args.load_hf:
        load_hf_weights(chunks, args.load_hf, config)
    optimizer = build_optimizer(chunks, args, state)  # its fp32 masters start from the weights loaded above
    num_micro = args.global_batch_size // (args.micro_batch_size * state.dp_size)
    plan = plan_pipeline(args, state, config, num_micro)

    from megaengine.data import MicroBatchLoader
    from megaengine.models import count_parameters
    loader = MicroBatchLoader(data.train, args.micro_batch_size, state.dp_rank, state.dp_size)
    iteration = 0
    root = resume_from(args)
    if root:
        iteration = checkpoint.load_training_state(root, chunks=chunks, optimizer=optimizer, loader=loader,
                                                   config=config, state=state, args=args)

    counts = count_parameters(config, state.tp_size)
    tokens_per_iter = args.global_batch_size * args.seq_length
    metrics_file = args.metrics_file or (os.path.join(args.save, "metrics.jsonl") if args.save else None)
    logger = ProgressLogger(total_iters=args.train_iters, tokens_per_iter=tokens_per_iter,
                            flops_per_iter=tokens_per_iter * flops_per_token(config, counts["matmul"]),
                            world_size=dist.get_world_size(), peak_tflops=device_peak_tflops(args.peak_tflops),
                            metrics_file=metrics_file, tensorboard_dir=args.tensorboard_dir, is_writer=is_rank0)
    if is_rank0:
        print(f"megaengine: {counts['total'] / 1e6:.2f}M parameters | tp {state.tp_size} pp {state.pp_size} "
              f"dp {state.dp_size} | {num_micro} micro-batches of {args.micro_batch_size} x {args.seq_length} "
              f"tokens per rank per step | vocab {config.vocab_size} | {state.device}", flush=True)

    for c in chunks:
        c.train()
    decay_iters = args.lr_decay_iters or args.train_iters
    window_loss, window_steps, window_time, skipped = torch.zeros((), device=state.device), 0, 0.0, 0
    zero = getattr(args, "zero", None)
    exit_signal, consecutive_skips, signalled = ExitSignal(args.exit_signal_handler), 0, False
    while iteration < args.train_iters:
        if zero is not None and zero.scheduler.type:  # the JSON's DeepSpeed schedule
            from megaengine.zero.engine import scheduler_lr
            lr = scheduler_lr(zero.scheduler, zero.optimizer.lr, iteration)
        else:
            lr = learning_rate(iteration, lr=args.lr, min_lr=args.min_lr, warmup_iters=args.lr_warmup_iters,
                               decay_iters=decay_iters, style=args.lr_decay_style)
        start = time.monotonic()
        minutes = args.distributed_timeout_minutes
        with watch("forward, backward and gradient reduction", iteration + 1, state, minutes):
            batches = next_batches(loader, num_micro, state.device, config.vocab_size)
            window_loss += train_step(chunks, optimizer, batches, plan, state)
        with watch("the optimizer step", iteration + 1, state, minutes):
            grad_norm, was_skipped = optimizer.step(lr)
        iteration += 1
        window_steps += 1
        skipped += int(was_skipped)
        window_time += time.monotonic() - start
        consecutive_skips = consecutive_skips + 1 if was_skipped else 0
        if was_skipped and is_rank0:
            print(f"iteration {iteration}: step skipped, non-finite gradients (grad norm {grad_norm}, "
                  f"loss scale {optimizer.loss_scale:g})", flush=True)

        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            with watch("loss logging", iteration, state, minutes):
                reduce_loss(window_loss, state)
            loss = window_loss.item() / (window_steps * state.dp_size)
            logger.log(iteration, loss=loss, lr=lr, grad_norm=grad_norm, iter_seconds=window_time / window_steps,
                       skipped=skipped)
            window_loss.zero_()
            window_steps, window_time = 0, 0.0
        if consecutive_skips >= args.max_skipped_steps:
            raise TrainingStopped(
                f"{consecutive_skips} consecutive steps skipped for inf/nan gradients (--max-skipped-steps "
                f"{args.max_skipped_steps}) at iteration {iteration}. The last checkpoint "
                f"({args.save or 'none: no --save'}) is untouched; lower --lr or check the data, then resume.")
        if data.valid is not None and args.eval_iters > 0 and (
                iteration % args.eval_interval == 0 or iteration == args.train_iters):
            with watch("evaluation", iteration, state, minutes):
                logger.log_eval(iteration, evaluate(chunks, data.valid, args, state, plan))
        with watch("the exit-signal check", iteration, state, minutes):
            signalled = args.exit_signal_handler and exit_signal.any_rank(state.device)
        exiting = signalled or (args.exit_interval and iteration % args.exit_interval == 0)
        # No save inside a run of skipped steps: the newest checkpoint stays the last good one.
        if args.save and consecutive_skips == 0 and ((args.save_interval and iteration % args.save_interval == 0)
                                                     or iteration == args.train_iters or exiting):
            with watch("the checkpoint save", iteration, state, minutes):
                checkpoint.save_training_state(args.save, iteration, chunks=chunks, optimizer=optimizer,
                                               loader=loader, config=config, state=state, args=args)
        if exiting:
            if is_rank0:
                why = "SIGTERM received" if signalled else f"--exit-interval {args.exit_interval}"
                print(f"exiting at iteration {iteration} ({why})", flush=True)
            break
    logger.close()
    if not signalled:
        with optimizer.gathered_params():  # stage 3 holds parameter shards outside forward/backward
            sample_text(chunks, data.tokenizer, args, state, config)
    checkpoint.finalize_async_saves()  # the last background save completes before the process group goes away
