from .load import load_model, load_tokenizer, resolve_model_path, compute_dtype

__all__ = ["load_model", "load_tokenizer", "resolve_model_path", "compute_dtype"]
