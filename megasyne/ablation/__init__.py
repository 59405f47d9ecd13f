"""Surrogate ablations: a grid of small continual-pre-training runs that decides a recipe.

The Llama-3-SynE paper chose its recipe (20% synthetic QA, perplexity-ascending web pages) by
continual pre-training of a small surrogate under a grid of variants. Here a grid file names a
base run config (+ its recipe) and axes; every cell of the cartesian product is an ordinary
``pretrain_syne.py`` run from the same ``init_checkpoint`` over the same preprocessed data, only
its recipe / config differing, then evaluated the same way as every other cell and as the base
model, and the results gathered into one table.

- ``grid``: the grid file, its expansion into cells, and each cell's materialised recipe and
  config (with the refusal of a cell whose definition changed since it ran).
- ``runner``: the cells one after another (torchrun per cell, resume, done markers), or a Slurm
  job-array script.
- ``evaluate``: the one evaluation of a checkpoint (validation perplexity per language and per
  source on held-out data, a benchmark subset through ``megasyne.eval``).
- ``table``: the results table (markdown, CSV, PNG).
"""
