"""Loss functions as free functions. Sample-wise losses return shape (B,) (``reduction="none"``), so they can
drive per-sample scores (``erasus.ops.grad_norms``) as well as training."""
from erasus.losses.token import per_sample_cross_entropy
from erasus.losses.unlearning import (distill_kl, gradient_ascent_loss, npo_from_logprobs, npo_loss,
                                      output_anchor_loss, simnpo_loss,
                                      weight_anchor_loss)

__all__ = ["per_sample_cross_entropy", "gradient_ascent_loss", "npo_loss", "npo_from_logprobs", "simnpo_loss",
           "distill_kl", "output_anchor_loss",
           "weight_anchor_loss"]
