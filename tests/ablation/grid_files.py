"""The tiny world of the ablation tests: the bundled corpus's first documents of three sources
preprocessed with a 512-token BPE (training data), the next ones as held-out data, a 2-layer
random Llama as the base checkpoint (made in transformers, converted), a one-stage recipe, a
base run config, and a 2x2 grid (zh share 10% / 40% x en_verse ascending / shuffled)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.launch import REPO_ROOT
from tests.training.pretrain_launch import CORPUS, SOURCES, make_run_files

SEQ, G, STEPS = 32, 4, 4


def heldout(root: Path, first: int = 18, count: int = 8) -> None:
    from megasyne.data.preprocess import PreprocessConfig, run_preprocess

    for s in SOURCES:
        docs = [json.loads(line) for line in (CORPUS / f"{s}.jsonl").open(encoding="utf-8")][first:first + count]
        raw = root / f"heldout_{s}.jsonl"
        raw.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        run_preprocess(PreprocessConfig(inputs=[str(raw)], output_prefix=str(root / f"heldout_{s}"),
                                        tokenizer=str(root / "tokenizer.json"), append_eod=True,
                                        log_interval=0, progress=False))


def base_checkpoint(root: Path) -> Path:
    """A random 2-layer Llama (vocab 512) in transformers, its tokenizer beside it, converted."""
    import torch
    import transformers

    from megasyne.checkpoint.hf_convert import hf_to_megasyne

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        rope_theta=10000.0)).eval()
    hf.save_pretrained(root / "hf_base")
    transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(root / "tokenizer.json"), bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>").save_pretrained(root / "hf_base")
    hf_to_megasyne(root / "hf_base", root / "base_ckpt", progress=False)
    return root / "base_ckpt"


def make_grid_files(root: Path) -> Path:
    """Everything above in ``root``; returns the grid file."""
    make_run_files(root, docs_per_source=18)
    heldout(root)
    base_checkpoint(root)
    recipe = dict(seq_length=SEQ, seed=7, on_exhaustion="new_epoch", sources={
        "zh_poetry": str(root / "zh_poetry_text_document"),
        "en_drama": {"prefix": str(root / "en_drama_text_document"), "order": "sequential"},
        "en_verse": {"prefix": str(root / "en_verse_text_document"), "order": "ascending:n_chars"},
    }, stages=[dict(name="cpt", samples=STEPS * G,
                    weights={"zh": {"weight": 2, "children": {"zh_poetry": 1}},
                             "en": {"weight": 8, "children": {"en_drama": 0.5, "en_verse": 0.5}}})])
    (root / "grid_recipe.yaml").write_text(yaml.safe_dump(recipe))
    eval_recipe = dict(seq_length=SEQ, seed=1, on_exhaustion="new_epoch", sources={
        s: str(root / f"heldout_{s}_text_document") for s in SOURCES},
        stages=[dict(name="heldout", samples=16,
                     weights={"zh": {"weight": 1, "children": {"zh_poetry": 1}},
                              "en": {"weight": 1, "children": {"en_drama": 1, "en_verse": 1}}})])
    (root / "heldout.yaml").write_text(yaml.safe_dump(eval_recipe))
    base = dict(recipe="grid_recipe.yaml", model="init_checkpoint", init_checkpoint="base_ckpt",
                parallel=dict(tp=1), optim=dict(lr=3e-3, min_lr=3e-4),
                schedule=dict(kind="wsd", warmup_steps=1, decay_steps=2, decay_shape="1-sqrt"),
                micro_batch_size=2, global_batch_size=G, save_interval=1, keep_last=2,
                tensorboard=False)
    (root / "grid_base.yaml").write_text(yaml.safe_dump(base))
    (root / "bench.yaml").write_text(yaml.safe_dump(dict(
        data_root=str(REPO_ROOT / "examples" / "eval" / "fixture"),
        tasks=[dict(name="mmlu", format="mmlu", path="mmlu", num_fewshot=0, max_items=3)])))
    order = "recipe.sources.en_verse.order"
    grid = dict(
        output="out", base=dict(config="grid_base.yaml"), ranks=1,
        evaluation=dict(eval_recipe="heldout.yaml", eval_samples=8, micro_batch_size=2,
                        interval=STEPS, bench=dict(tasks="bench.yaml", max_items=3, batch_size=4)),
        axes={"zh": [{"name": "zh10", "x": 10, "set": {"recipe.stages.cpt.share.zh": 0.1}},
                     {"name": "zh40", "x": 40, "set": {"recipe.stages.cpt.share.zh": 0.4}}],
              "order": [{"name": "asc", "set": {order: "ascending:n_chars"}},
                        {"name": "shuf", "set": {order: "shuffle"}}]},
        plot=dict(x="zh", lines="order", metrics=["ppl", "mmlu acc"]))
    (root / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    return root / "grid.yaml"
