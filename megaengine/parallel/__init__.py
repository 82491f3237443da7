"""Process groups and collectives: the mesh (mesh.py) and autograd-aware communication (comm.py)."""
from megaengine.parallel.mesh import (ConfigError, ParallelState, check_layout, destroy, get_state,
                                      init_distributed, initialize, is_initialized, seed_everything)

__all__ = ["ConfigError", "ParallelState", "check_layout", "destroy", "get_state", "init_distributed",
           "initialize", "is_initialized", "seed_everything"]
