"""Our SDPA core attention equals Megatron's DotProductAttention (GQA and MHA, fp32)."""

import json
import subprocess
import sys

from tests.launch import REPO_ROOT


def test_sdpa_matches_megatron_dot_product_attention():
    proc = subprocess.run([sys.executable, "tests/model/attention_worker.py"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(next(line for line in proc.stdout.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    for name, r in result.items():
        assert r["core"] == "SDPAttention", name
        assert r["loss_diff"] < 1e-5, (name, r)
        assert r["logit_diff"] < 1e-4, (name, r)
        assert r["grad_diff"] < 1e-5, (name, r)
