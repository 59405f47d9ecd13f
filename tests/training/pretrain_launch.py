"""Launch pretrain_syne.py from tests on 2 gloo ranks, optionally SIGKILLing it mid-run; and the
small run they share (make_run_files: real text, a tokenizer, three sources, a two-stage recipe)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.launch import REPO_ROOT

CORPUS = REPO_ROOT / "examples" / "tiny" / "data"
SOURCES = ("en_drama", "en_verse", "zh_poetry")
G, SEQ, STEPS, STAGE1_STEPS = 8, 32, 10, 6


def make_run_files(root: Path, docs_per_source: int = 60, max_doc_chars: int | None = None) -> None:
    """In ``root``: a 512-token BPE, the bundled corpus's first documents of three sources
    preprocessed, ``recipe.yaml`` (stage1 zh:en 2:8 for STAGE1_STEPS steps, stage2 for the rest,
    STEPS steps of G samples of SEQ tokens) and ``base.yaml`` (TP2 on 2 ranks, checkpoints
    every 2 steps). ``max_doc_chars``: each document cut into documents of at most that many
    characters (the corpus's are hundreds of tokens: a SEQ-token sample rarely holds two)."""
    import yaml

    from megasyne.data.preprocess import PreprocessConfig, run_preprocess
    from megasyne.data.tokenizers import train_byte_level_bpe

    docs = {s: [json.loads(line) for line in (CORPUS / f"{s}.jsonl").open(encoding="utf-8")]
            [:docs_per_source] for s in SOURCES}
    if max_doc_chars:
        docs = {s: [{**d, "text": d["text"][i:i + max_doc_chars],
                     "n_chars": len(d["text"][i:i + max_doc_chars])}
                    for d in ds for i in range(0, len(d["text"]), max_doc_chars)]
                for s, ds in docs.items()}
    train_byte_level_bpe((d["text"] for s in SOURCES for d in docs[s]), 512, root / "tokenizer.json")
    for s in SOURCES:
        raw = root / f"{s}.jsonl"
        raw.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs[s]),
                       encoding="utf-8")
        run_preprocess(PreprocessConfig(inputs=[str(raw)], output_prefix=str(root / s),
                                        tokenizer=str(root / "tokenizer.json"),
                                        metadata_keys=["n_chars"], append_eod=True,
                                        log_interval=0, progress=False))
    recipe = dict(seq_length=SEQ, seed=7, on_exhaustion="new_epoch", sources={
        "zh_poetry": str(root / "zh_poetry_text_document"),
        "en_drama": {"prefix": str(root / "en_drama_text_document"), "order": "sequential"},
        "en_verse": {"prefix": str(root / "en_verse_text_document"), "order": "ascending:n_chars"},
    }, stages=[
        dict(name="stage1", samples=STAGE1_STEPS * G,
             weights={"zh": {"weight": 2, "children": {"zh_poetry": 1}},
                      "en": {"weight": 8, "children": {"en_drama": 0.5, "en_verse": 0.5}}}),
        dict(name="stage2", samples=(STEPS - STAGE1_STEPS) * G,
             weights={"zh_poetry": 0.2, "en_drama": 0.6, "en_verse": 0.2}),
    ])
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    base = dict(recipe="recipe.yaml", model="tiny_debug",
                model_overrides=dict(vocab_size=512, max_position_embeddings=SEQ),
                parallel=dict(tp=2), optim=dict(lr=2e-3, min_lr=2e-4),
                schedule=dict(kind="wsd", warmup_steps=2, decay_steps=3, decay_shape="1-sqrt"),
                stage_settings=dict(stage2=dict(lr=1e-3, min_lr=1e-4,
                                                schedule=dict(kind="cosine", warmup_steps=1))),
                micro_batch_size=2, global_batch_size=G, save_interval=2, keep_last=10,
                tensorboard=False)
    (root / "base.yaml").write_text(yaml.safe_dump(base))


def launch(root: Path, run: str, *overrides: str, kill_at_step: int | None = None,
           config: str = "base.yaml", term_at_step: int | None = None, nproc: int = 2):
    """Run pretrain_syne.py on 2 ranks; with kill_at_step, SIGKILL the whole job as soon as
    metrics.jsonl shows that step (the launcher and both ranks, like a lost node); with
    term_at_step, SIGTERM both ranks then (a cluster's preemption notice).

    ``nproc=1``: one plain process, no torchrun (pretrain_syne.py runs alone as world size 1),
    for launches whose check is rank 0's alone, e.g. a refusal at start-up: it spares
    torchrun's own start-up and a second rank's imports (the overrides must give a 1-rank
    layout, e.g. parallel.tp=1)."""
    if nproc == 1:
        if term_at_step is not None:
            raise ValueError("term_at_step signals the ranks of a torchrun launcher: use nproc=2")
        runner = [sys.executable]
    else:
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc_per_node={nproc}"]
    cmd = [*runner, "pretrain_syne.py",
           "--config", str(root / config), "--set", f"run_dir={root / run}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    if kill_at_step is not None or term_at_step is not None:
        at = kill_at_step if kill_at_step is not None else term_at_step
        metrics, deadline = root / run / "metrics.jsonl", time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= at:
                if kill_at_step is not None:
                    _kill_tree(proc.pid)
                else:
                    _signal_ranks(proc.pid, signal.SIGTERM)
                break
            time.sleep(0.02)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and its ranks (torchrun starts each rank in its own session)."""
    import psutil

    for p in psutil.Process(pid).children(recursive=True):
        p.send_signal(signal.SIGKILL)
    os.killpg(pid, signal.SIGKILL)


def _signal_ranks(pid: int, signum: int) -> None:
    """Send ``signum`` to the ranks of a launcher and to every process they started, as a
    cluster's preemption notice does (Slurm signals every process of the job step). Not to
    the launcher itself: torchrun would stop the ranks on its own and exit with an error."""
    import psutil

    for p in psutil.Process(pid).children(recursive=True):
        try:
            p.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def launch_nodes(root: Path, run: str, torchrun_args: list[str], *overrides: str,
                 nnodes: int = 2, config: str = "base.yaml", timeout: float = 600):
    """Run pretrain_syne.py as ``nnodes`` separate torchrun launchers, like one per node of a
    multi-node job, all with the same ``torchrun_args`` (``--nnodes`` and a c10d rendezvous;
    e.g. what examples/syne/slurm_torchrun.sh builds). Returns each launcher's result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "pretrain_syne.py",
           "--config", str(root / config), "--set", f"run_dir={root / run}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
             for _ in range(nnodes)]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # e.g. a launcher left waiting for the rendezvous
            for p in procs:
                if p.poll() is None:
                    _kill_tree(p.pid)
            out, err = proc.communicate()
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


def records(root: Path, run: str) -> list[dict]:
    return [json.loads(line) for line in (root / run / "metrics.jsonl").read_text().splitlines()]
