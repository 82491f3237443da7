"""FP8 training: formats, casts, scaling recipes (tensorwise, rowwise, delayed) and the FP8 linear layer."""
from megaengine.fp8.cast import Quantized, amax, amax_to_scale, cast_to_fp8, gemm, quantize, scaled_mm
from megaengine.fp8.config import FP8Config, check_fp8_run
from megaengine.fp8.formats import E4M3, E5M2, FORMATS, FP8Format
from megaengine.fp8.linear import FP8Linear, fp8_linear
from megaengine.fp8.scaling import CurrentScaling, DelayedScaling, make_scaling, set_grad_divisor, update_amax_history

__all__ = ["E4M3", "E5M2", "FORMATS", "CurrentScaling", "DelayedScaling", "FP8Config", "FP8Format", "FP8Linear",
           "Quantized", "amax", "amax_to_scale", "cast_to_fp8", "check_fp8_run", "fp8_linear", "gemm",
           "make_scaling", "quantize", "scaled_mm", "set_grad_divisor", "update_amax_history"]
