"""Plan a run before launching it: per-rank memory (parameters, gradients, optimizer state, activations) and
a predicted step time for any layout, and a search over layouts (`python -m megaengine.plan`).

    activations.py  bytes autograd keeps per layer / chunk / micro-batch (closed form, derived in its docstring)
    measure.py      the saved-tensor counter the closed form is checked against
    memory.py       parameter, gradient and optimizer bytes exactly as ZeroOptimizer allocates them
    moe.py          what an MoE layer keeps for backward (closed form, derived in its docstring), its dispatch traffic
    layout.py       Layout, and the one function that reads pretrain_gpt.py's flags
    predict.py      the busiest rank's memory, the step time model
    search.py       layouts that fit N GPUs, fastest first
"""
from megaengine.plan.activations import chunk_bytes, kernels_for, layer_bytes, layer_terms
from megaengine.plan.layout import Layout
from megaengine.plan.memory import chunk_params, state_bytes
from megaengine.plan.predict import Hardware, predict_memory, step_time

__all__ = ["Hardware", "Layout", "chunk_bytes", "chunk_params", "kernels_for", "layer_bytes", "layer_terms",
           "predict_memory", "state_bytes", "step_time"]
