"""Checkpoints that reshard: one format and one implementation for pretrain_gpt.py and megaengine.initialize
engines (manager.py), its files (store.py), where each rank's tensors sit in the global ones (pieces.py), and
the whole model in one process (consolidate.py); replicated module buffers (buffers.py)."""
from megaengine.checkpoint.buffers import load_buffers, named_buffers
from megaengine.checkpoint.consolidate import consolidated_state_dict, load_model
from megaengine.checkpoint.manager import KINDS, Checkpointer, Layout, Loaded
from megaengine.checkpoint.pieces import FORMAT, PieceReader, param_pieces
from megaengine.checkpoint.store import (META, POINTER, checkpoint_dir, iteration_dir, latest_iteration, latest_tag,
                                         load_data_file, load_meta)

__all__ = ["FORMAT", "KINDS", "META", "POINTER", "Checkpointer", "Layout", "Loaded", "PieceReader",
           "checkpoint_dir", "consolidated_state_dict", "iteration_dir", "latest_iteration", "latest_tag",
           "load_buffers", "load_data_file", "load_meta", "load_model", "named_buffers", "param_pieces"]
