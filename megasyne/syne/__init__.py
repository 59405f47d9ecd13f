"""The Llama-3-SynE data recipe tools, as a library (the faces are ``tools/*.py``).

- :mod:`megasyne.syne.topic_mixture` — the adaptive topic-mixture update rule (pure, JSON-able decisions).
- :mod:`megasyne.syne.ppl` — per-document perplexity with a megasyne checkpoint (any TP/PP/DP)
  or a Hugging Face model (the scorers of :mod:`megasyne.scorers`), windowed, batched, resumable
  (:mod:`megasyne.syne.blocks`); ``tools/score_ppl.py``.
- :mod:`megasyne.syne.topics` + :mod:`megasyne.syne.labeling` — topic taxonomy
  (``examples/syne/taxonomy.yaml``), an offline CPU classifier, dataset/JSONL labelling and its
  evaluation; ``tools/label_topics.py``.
- :mod:`megasyne.syne.synth` — synthetic scientific QA (templates, generators, filters, pipeline);
  ``tools/synth_qa.py``.
"""
