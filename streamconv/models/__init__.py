"""Model families: declarative tables from HF names to target names and split rules.  The only place in
streamconv that knows what a DeepSeek-V3 is."""
