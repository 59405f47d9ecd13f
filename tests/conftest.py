"""Shared fixtures of the training tests."""

import pytest


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
