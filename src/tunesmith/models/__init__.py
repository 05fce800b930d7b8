from .load import load_model, load_tokenizer, resolve_model_path, compute_dtype
from .quant import load_base, load_quantized

__all__ = ["load_model", "load_tokenizer", "resolve_model_path", "compute_dtype", "load_base", "load_quantized"]
