"""rcn_dist: distributed training of the Recurrent Capsule Network (RCN)."""

__version__ = "0.1.0"
