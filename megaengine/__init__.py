"""megaengine: tensor-, pipeline- and data-parallel GPT pretraining on torch.distributed."""
from megaengine.zero.engine import initialize

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """The whole GPT (tp=1, pp=1) from a checkpoint of any layout, for evaluation and notebooks."""
    from megaengine.checkpoint import load_model as load
    return load(path, device)


__all__ = ["initialize", "load_model"]
