from rcn_dist.cli import entry

entry()
