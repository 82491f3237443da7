"""Pipeline parallelism: schedules as data (schedules), their simulator (simulate, also a CLI: python -m
megaengine.pipeline.simulate), the layer partition (partition) and the executor (executor)."""
from megaengine.pipeline.executor import backward_split, run_pipeline
from megaengine.pipeline.partition import layer_ranges
from megaengine.pipeline.schedules import SCHEDULES, Action, build, validate

__all__ = ["SCHEDULES", "Action", "backward_split", "build", "layer_ranges", "run_pipeline", "validate"]
