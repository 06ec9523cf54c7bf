"""Split rules: how one target tensor of one rank is derived from source tensors.  Pure and shape-only."""
