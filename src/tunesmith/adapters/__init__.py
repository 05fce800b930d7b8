from .lora import apply_adapter, count_parameters, save_trained

__all__ = ["apply_adapter", "count_parameters", "save_trained"]
