"""Synthetic scientific QA for SynE stage II: :mod:`.templates` (discipline prompts),
:mod:`.generators` (OpenAI-compatible HTTP, local transformers), :mod:`.filters` (parsing,
validation, MinHash near-duplicates, n-gram contamination), :mod:`.pipeline` (the run, answers
judged in item order), :mod:`.store` (its files, crash-safe resume)."""
