"""Everything distributed: launch detection, the DeepSpeed engine, checkpoints, the pipeline split.

Nothing in rcn_dist.model imports from here or from torch.distributed."""
