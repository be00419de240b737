"""The search engine: trials of configurations behind an evaluator, and the strategies that
choose which to try."""
