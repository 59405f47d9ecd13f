"""Checkpoint layouts: full (TP1/PP1) <-> per-rank shards, HF <-> megasyne name mapping."""
