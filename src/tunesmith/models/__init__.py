from .load import load_model, load_tokenizer, resolve_model_path
from .quant import load_base, load_quantized

__all__ = ["load_model", "load_tokenizer", "resolve_model_path", "load_base", "load_quantized"]
