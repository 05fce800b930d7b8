"""Full fine-tuning: every weight trains (fp32 master weights, bf16 matmuls under autocast)."""
from .common import Method, make_fully_trainable

METHOD = Method(
    name="full",
    description="every weight trains",
    make_trainable=make_fully_trainable,
    trains_all_weights=True,
)
