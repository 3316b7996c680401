"""Loss functions as free functions. Every loss here is per sample: shape (B,), ``reduction="none"`` over the
batch, so it can drive per-sample scores (``erasus.ops.grad_norms``) as well as training."""
from erasus.losses.token import per_sample_cross_entropy

__all__ = ["per_sample_cross_entropy"]
