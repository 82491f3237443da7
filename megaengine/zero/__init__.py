"""Data parallelism and ZeRO: the sharded optimizer (stages 0-3, optimizer.py), loss scaling, DeepSpeed JSON
configs (config.py) and `initialize(model, config)` (engine.py)."""
from megaengine.zero.config import DeepSpeedConfig, OptimConfig, load_config
from megaengine.training.lr_schedule import scheduler_lr
from megaengine.zero.engine import ZeroEngine, initialize
from megaengine.zero.loss_scale import DynamicLossScaler, StaticLossScaler
from megaengine.zero.optimizer import ZeroOptimizer, trainable_params

__all__ = ["DeepSpeedConfig", "OptimConfig", "DynamicLossScaler", "StaticLossScaler", "ZeroEngine", "ZeroOptimizer", "initialize",
           "load_config", "scheduler_lr", "trainable_params"]
