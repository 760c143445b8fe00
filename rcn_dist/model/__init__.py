"""The single-device Recurrent Capsule Network (no distributed imports here; see docs/model.md)."""

from rcn_dist.model.capsules import PrimaryCapsules, RoutedCapsules, dynamic_routing, squash
from rcn_dist.model.losses import bits_per_dim, kl_standard_normal, margin_loss
from rcn_dist.model.rcn import (
    RCN,
    Carry,
    Decoder,
    Encoder,
    RCNOutput,
    describe,
    noise_for,
    sample_noise,
    step_noise_seed,
)

__all__ = [
    "RCN", "RCNOutput", "Carry", "Encoder", "Decoder", "squash", "dynamic_routing", "PrimaryCapsules",
    "RoutedCapsules", "margin_loss", "kl_standard_normal", "bits_per_dim", "sample_noise", "noise_for",
    "step_noise_seed", "describe",
]
