"""megaengine: tensor-, pipeline- and data-parallel GPT pretraining on torch.distributed."""
from megaengine.zero.engine import initialize

__all__ = ["initialize"]
__version__ = "0.1.0"
