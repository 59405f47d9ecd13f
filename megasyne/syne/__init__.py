"""The Llama-3-SynE data recipe tools, as a library (the faces are ``tools/*.py``).

- :mod:`megasyne.syne.adaptive` — the adaptive topic-mixture update rule (pure, JSON-able decisions).
- :mod:`megasyne.syne.ppl` — per-document perplexity with a megasyne checkpoint (any TP/PP/DP) or a
  Hugging Face model, windowed, batched, resumable (:mod:`megasyne.syne.blocks`).
- :mod:`megasyne.syne.topics` — topic taxonomy (``taxonomy.yaml``) and an offline CPU classifier.
- :mod:`megasyne.syne.synth` — synthetic scientific QA generation (templates, backends, filters).
"""
