"""Plan a run before launching it: per-rank memory (parameters, gradients, optimizer state, activations) and
a predicted step time for any layout, and a search over layouts (`python -m megaengine.plan`)."""
