"""Parallel layouts as pure functions of sizes: which rank files exist and where each layer goes."""
