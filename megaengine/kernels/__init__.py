"""Fused kernels: flash attention, LayerNorm and RMSNorm in Triton (CUDA, or CPU under TRITON_INTERPRET=1),
the norms also in CUDA C++ (csrc/, backend "cuda"), each beside the plain torch reference it is tested against.
attention.py holds attention; norms.py the kernels LayerNorm (layernorm.py) and RMSNorm (rmsnorm.py) share;
select.py the model's backend "auto" (the fastest correct implementation per shape class, timed once).

backend=None picks Triton for CUDA tensors and the torch reference for CPU tensors."""
from megaengine.kernels.attention import attention_reference, flash_attention
from megaengine.kernels.layernorm import layer_norm, layer_norm_reference
from megaengine.kernels.rmsnorm import rms_norm, rms_norm_reference

__all__ = ["attention_reference", "flash_attention", "layer_norm", "layer_norm_reference", "rms_norm",
           "rms_norm_reference"]
