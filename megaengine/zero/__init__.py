"""Data parallelism and ZeRO: the sharded optimizer (stages 0-3, optimizer.py), loss scaling, DeepSpeed JSON
configs (config.py), `initialize(model, config)` (engine.py) and `zero_init()` (init.py)."""
from megaengine.zero.config import DeepSpeedConfig, OptimConfig, load_config
from megaengine.training.lr_schedule import scheduler_lr
from megaengine.zero.engine import ZeroEngine, initialize
from megaengine.zero.init import zero_init
from megaengine.zero.loss_scale import DynamicLossScaler, StaticLossScaler
from megaengine.zero.optimizer import ZeroOptimizer, trainable_params

__all__ = ["DeepSpeedConfig", "OptimConfig", "DynamicLossScaler", "StaticLossScaler", "ZeroEngine", "ZeroOptimizer",
           "initialize", "load_config", "zero_init", "scheduler_lr", "trainable_params"]
