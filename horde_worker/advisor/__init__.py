"""`--benchmark`: measure this machine with the worker's own pipeline and recommend its settings."""
