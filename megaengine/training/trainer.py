"""The training loop behind pretrain_gpt.py: flags -> mesh -> data -> model -> optimizer -> steps.

`main(argv)` is the entry point: it turns every user mistake into one message from rank 0 and a non-zero
exit. `train(args)` runs the loop; `train_step` does one optimizer step over the iteration's micro-batches.
"""
from __future__ import annotations

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
from megaengine.training.args import model_config, parse_args, validate
from megaengine.training.lr_schedule import learning_rate
from megaengine.training.metrics import ProgressLogger, device_peak_tflops, flops_per_token


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = parse_args(argv)
        validate(args, world)
        train(args)
    except ConfigError as e:
        # Every rank reaches the same verdict from the same flags and files; only rank 0 speaks.
        if rank == 0:
            print(f"megaengine: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        parallel.destroy()
    return 0


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


def build_model(config, state, args):
    from megaengine.models import GPT
    model = GPT(config, state.tp_group)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return model.to(device=state.device, dtype=dtype)


def build_optimizer(model_chunks, args, state):
    """Plain data parallel (stage 0) or Megatron's distributed optimizer (ZeRO-1) from the flags."""
    from megaengine.zero.optimizer import ZeroOptimizer
    return ZeroOptimizer(
        model_chunks, stage=1 if args.use_distributed_optimizer else 0, lr=args.lr,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, dp_group=state.dp_group, tp_group=state.tp_group, pp_group=state.pp_group,
        reduce_bucket_size=args.ddp_bucket_size, overlap_comm=args.overlap_grad_reduce)


def train_step(model, optimizer, loader, num_microbatches: int, device) -> float:
    """Forward and backward over the iteration's micro-batches, then one optimizer step.
    Returns this rank's mean loss over its micro-batches."""
    optimizer.zero_grad()
    total = torch.zeros((), device=device)
    for i in range(num_microbatches):
        tokens, labels = (t.to(device) for t in loader.next_microbatch())
        optimizer.set_is_last_microbatch(i == num_microbatches - 1)
        loss = model(tokens, labels).float().mean() / num_microbatches
        optimizer.scale_loss(loss).backward()
        total += loss.detach()
    return total


@torch.no_grad()
def evaluate(model, dataset, args, state) -> float:
    from megaengine.data import MicroBatchLoader
    model.eval()
    loader = MicroBatchLoader(dataset, args.micro_batch_size, state.dp_rank, state.dp_size)
    total = torch.zeros((), device=state.device)
    steps = args.eval_iters * (args.global_batch_size // (args.micro_batch_size * state.dp_size))
    for _ in range(steps):
        tokens, labels = (t.to(state.device) for t in loader.next_microbatch())
        total += model(tokens, labels).float().mean()
    model.train()
    comm.all_reduce(total, state.dp_group)
    return total.item() / (steps * state.dp_size)


def rng_state() -> dict:
    import random as pyrandom
    from megaengine.tensor_parallel import random as tp_random
    return {"python": pyrandom.getstate(), "numpy": np.random.get_state(), "torch": tp_random.get_states()}


def set_rng_state(s: dict) -> None:
    import random as pyrandom
    from megaengine.tensor_parallel import random as tp_random
    pyrandom.setstate(s["python"])
    np.random.set_state(s["numpy"])
    tp_random.set_states(s["torch"])


def layout(args, state) -> dict:
    return {"tp": state.tp_size, "pp": state.pp_size, "dp": state.dp_size}


def save_checkpoint(args, iteration, model, optimizer, loader, config, state) -> None:
    meta = {"iteration": iteration, "consumed_samples": loader.consumed_samples, "layout": layout(args, state),
            "model": config.to_dict(), "args": {k: v for k, v in vars(args).items()}}
    rank_state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
                  "loader": loader.state_dict(), "iteration": iteration}
    path = checkpoint.save(args.save, iteration, rank_state, meta)
    if dist.get_rank() == 0:
        print(f"saved checkpoint {path}", flush=True)


def resume_from(args) -> str | None:
    """--load, or --save when it already holds a checkpoint (a restarted job picks up where it died)."""
    if args.load:
        return args.load
    if args.save and checkpoint.latest_iteration(args.save) is not None:
        return args.save
    return None


def load_checkpoint(root, args, model, optimizer, loader, config, state) -> int:
    iteration, meta = checkpoint.load_meta(root)
    path = checkpoint.iteration_dir(root, iteration)
    checkpoint.check_layout(meta, layout(args, state), path)
    checkpoint.check_model_config(meta, config.to_dict(), path)
    rank_state = checkpoint.load_rank_state(root, iteration)
    model.load_state_dict(rank_state["model"])
    optimizer.load_state_dict(rank_state["optimizer"])
    loader.load_state_dict(rank_state["loader"])
    set_rng_state(rank_state["rng"])
    if dist.get_rank() == 0:
        print(f"resumed from {path} at iteration {iteration}", flush=True)
    return iteration


def sample_text(model, tokenizer, args, state) -> None:
    if args.sample_tokens <= 0:
        return
    prompt = "def main("
    ids = torch.tensor([[tokenizer.bos] + tokenizer.encode(prompt)], device=state.device)
    g = torch.Generator(device=state.device).manual_seed(args.seed)
    out = model.generate(ids, args.sample_tokens, generator=g)
    if dist.get_rank() == 0:
        print("sample:\n" + prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist()), flush=True)


def train(args) -> None:
    state = parallel.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                backend=args.distributed_backend, seed=args.seed,
                                timeout_minutes=args.distributed_timeout_minutes)
    if state.pp_size > 1:
        raise ConfigError("--pipeline-model-parallel-size > 1 is not supported yet.")
    is_rank0 = dist.get_rank() == 0
    data = build_data(args, state)
    if args.data_path:
        check_token_range(data.train, data.tokenizer.vocab_size, args)
    config = model_config(args, data.tokenizer.vocab_size)
    model = build_model(config, state, args)
    optimizer = build_optimizer([model], args, state)
    num_micro = args.global_batch_size // (args.micro_batch_size * state.dp_size)

    from megaengine.data import MicroBatchLoader
    from megaengine.models import count_parameters
    loader = MicroBatchLoader(data.train, args.micro_batch_size, state.dp_rank, state.dp_size)
    iteration = 0
    root = resume_from(args)
    if root:
        iteration = load_checkpoint(root, args, model, optimizer, loader, config, state)

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

    model.train()
    decay_iters = args.lr_decay_iters or args.train_iters
    window_loss, window_steps, window_time, skipped = torch.zeros((), device=state.device), 0, 0.0, 0
    while iteration < args.train_iters:
        lr = learning_rate(iteration, lr=args.lr, min_lr=args.min_lr, warmup_iters=args.lr_warmup_iters,
                           decay_iters=decay_iters, style=args.lr_decay_style)
        start = time.monotonic()
        window_loss += train_step(model, optimizer, loader, num_micro, state.device)
        grad_norm, was_skipped = optimizer.step(lr)
        iteration += 1
        window_steps += 1
        skipped += int(was_skipped)
        window_time += time.monotonic() - start

        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            comm.all_reduce(window_loss, state.dp_group)
            loss = window_loss.item() / (window_steps * state.dp_size)
            logger.log(iteration, loss=loss, lr=lr, grad_norm=grad_norm, iter_seconds=window_time / window_steps,
                       skipped=skipped)
            window_loss.zero_()
            window_steps, window_time = 0, 0.0
        if data.valid is not None and args.eval_iters > 0 and (
                iteration % args.eval_interval == 0 or iteration == args.train_iters):
            logger.log_eval(iteration, evaluate(model, data.valid, args, state))
        exiting = args.exit_interval and iteration % args.exit_interval == 0
        if args.save and ((args.save_interval and iteration % args.save_interval == 0)
                          or iteration == args.train_iters or exiting):
            save_checkpoint(args, iteration, model, optimizer, loader, config, state)
        if exiting:
            if is_rank0:
                print(f"exiting at iteration {iteration} (--exit-interval {args.exit_interval})", flush=True)
            break
    logger.close()
    sample_text(model, data.tokenizer, args, state)
