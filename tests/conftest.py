"""Fixtures shared across test directories: a converted random GQA Llama, and SmolLM2-135M-Instruct
(its HF directory and one megasyne conversion of it), each made once per session."""

from pathlib import Path

import pytest

from tests.scripts import run_tool


@pytest.fixture(scope="session")
def converted_gqa(tmp_path_factory):
    """A random GQA Llama (tests/checkpoint/hf_models.py "gqa") in ``hf/`` and its megasyne
    conversion in ``ms/``; tests write their own result files beside them."""
    from megasyne.checkpoint.hf_convert import hf_to_megasyne
    from tests.checkpoint.hf_models import make_hf_model

    out = tmp_path_factory.mktemp("converted_gqa")
    make_hf_model("gqa", out / "hf")
    hf_to_megasyne(out / "hf", out / "ms", progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """SmolLM2-135M-Instruct as an HF directory (tools/prepare_smollm2.py, cached outside the
    repository after the first run)."""
    return Path(run_tool("tools/prepare_smollm2.py").stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def smollm2_megasyne(smollm2_hf, tmp_path_factory) -> Path:
    """SmolLM2 converted by ``tools/convert_hf.py hf-to-megasyne --tp 1``: the streaming
    single-process path. tests/checkpoint/test_smollm2.py checks its logits against
    transformers' and tests/eval/test_smollm2.py its benchmark scores; one conversion serves
    both (~7 s on 2 cores). Read-only: tests write their results elsewhere."""
    out = tmp_path_factory.mktemp("smollm2_megasyne") / "ms_stream"
    run_tool("tools/convert_hf.py", "hf-to-megasyne", "--hf-dir", smollm2_hf, "--output", out,
             "--tp", "1", "--no-progress")
    return out
