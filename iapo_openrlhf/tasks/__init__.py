"""Download-free tasks for CPU-scale runs: a synthetic arithmetic task and a tiny warm-started policy."""
