"""Synthetic scientific QA for SynE stage II: :mod:`.templates` (discipline prompts),
:mod:`.backends` (OpenAI-compatible HTTP, local transformers), :mod:`.filters` (parsing,
validation, MinHash near-duplicates, n-gram contamination), :mod:`.pipeline` (resumable run)."""
