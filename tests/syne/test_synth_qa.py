"""tools/synth_qa.py: templates, parsing and filters, the HTTP backend against a loopback server
(concurrency, retries, timeouts, every filter, kill and resume), output readable by preprocess.

The end-to-end run with a real model (SmolLM2-135M-Instruct) is in test_synth_smollm2.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megasyne.syne.synth.filters import (
    Contamination,
    NearDuplicates,
    QAPair,
    copied_from_seed,
    language_ok,
    parse_qa,
    validate,
)
from megasyne.syne.synth.generators import OpenAIChatBackend, Request
from megasyne.syne.synth.pipeline import SynthConfig, read_seed_pages, run_synth, snippets
from megasyne.syne.synth.templates import TemplateError, load_disciplines
from tests.launch import REPO_ROOT
from tests.syne.fake_openai import BENCH_QUESTION, PAIR_A, PAIR_B, FakeOpenAI

DISCIPLINES = REPO_ROOT / "examples/syne/disciplines.yaml"
PAPER_DISCIPLINES = ["math", "physics", "chemistry", "biology", "astronomy", "earth_science",
                     "medicine", "computer_science", "general_education"]
FILLER = ("Measurements of motion were made on an inclined plane with a water clock, and the "
          "distances covered in equal times grew as the odd numbers one, three, five and seven. "
          "The observers repeated each trial many times and recorded the results in a notebook.")
CASES = ["good_a", "good_b", "dup_a", "contam", "noanswer", "zh_wrong", "flaky500", "slow",
         "toolong", "bad400"]
EXPECTED = {"kept": 4, "near_duplicate": 1, "contaminated": 1, "no_solution": 1,
            "wrong_language": 1, "truncated": 1}


def test_templates_cover_the_nine_disciplines():
    d = load_disciplines(DISCIPLINES)
    assert list(d.items) == PAPER_DISCIPLINES
    for disc in d.items.values():
        assert set(disc.prompts) == {"en", "zh"}
        msgs, prefix = disc.messages("SNIPPET TEXT", "en")
        assert msgs[0]["role"] == "system" and "SNIPPET TEXT" in msgs[1]["content"]
        assert f"create a high-quality {disc.name} problem and solution" in msgs[1]["content"]
        assert prefix == "Problem:"
    assert d.route(topic="physics", text="The planet's orbit around the star") == "astronomy"
    assert d.route(topic="physics", text="A force acts on a mass") == "physics"
    assert d.route(topic="history_geography", text="the earthquake and the plate") == "earth_science"
    assert d.route(topic="history_geography", text="the history of the empire") == "general_education"
    assert d.route(discipline="chemistry") == "chemistry" and d.route(topic="cooking") is None


def test_bad_template_names_file_and_field(tmp_path):
    bad = tmp_path / "d.yaml"
    bad.write_text("defaults:\n  prompts:\n    en: {system: s, user: 'use {content} and {topic}'}\n"
                   "disciplines:\n  - {id: math, name: mathematics}\n")
    with pytest.raises(TemplateError, match=r"d.yaml: defaults.prompts.en.user: unknown placeholder \{topic\}"):
        load_disciplines(bad)
    bad.write_text("disciplines:\n  - {id: Math, name: m, prompts: {en: {system: s, user: '{content}'}}}\n")
    with pytest.raises(TemplateError, match=r"disciplines\[0\].id"):
        load_disciplines(bad)


@pytest.mark.parametrize("text, expected", [
    ("Problem: What is 2 + 3?\nSolution: 2 + 3 = 5.", ("What is 2 + 3?", "2 + 3 = 5.")),
    ("**Problem 1:** Find x.\n\n**Solution:** x = 4.\n\n**Problem 2:** more", ("Find x.", "x = 4.")),
    ("### Question\nWhy?\n\n### Answer\nBecause.", ("Why?", "Because.")),
    ("问题：求方程的解。\n解答：x 等于 2。", ("求方程的解。", "x 等于 2。")),
])
def test_parse_formats(text, expected):
    pair, why = parse_qa(text)
    assert why is None and (pair.problem, pair.solution) == expected


@pytest.mark.parametrize("text, reason", [
    ("Here is a nice problem about circles.", "no_problem"),
    ("Problem: Find x.\nThe answer: 5", "no_solution"),
    ("Problem:\nSolution: x", "no_problem"),
])
def test_parse_failures(text, reason):
    assert parse_qa(text) == (None, reason)


def test_validation_reasons():
    limits = dict(min_problem_chars=10, max_problem_chars=200, min_solution_chars=10,
                  max_solution_chars=300)
    ok = QAPair(problem=PAIR_A[0], solution=PAIR_A[1])
    assert validate(ok, lang="en", seed=FILLER, limits=limits) is None
    assert validate(QAPair(problem="Tiny?", solution=PAIR_A[1]), lang="en", seed="",
                    limits=limits) == "problem_too_short"
    assert validate(QAPair(problem=PAIR_A[0], solution="x" * 400), lang="en", seed="",
                    limits=limits) == "solution_too_long"
    assert validate(QAPair(problem="<the problem> goes here, with more words", solution=PAIR_A[1]), lang="en",
                    seed="", limits=limits) == "template_placeholder"
    assert validate(ok, lang="zh", seed="", limits=limits) == "wrong_language"
    copied = QAPair(problem=FILLER[:150], solution=PAIR_A[1])
    assert validate(copied, lang="en", seed=FILLER, limits=limits) == "copied_seed"
    assert language_ok("二加三等于五，所以答案是 5。", "zh") and not language_ok("二加三", "en")
    assert not copied_from_seed(PAIR_A[0], FILLER)


def test_near_duplicates_and_contamination(tmp_path):
    nd = NearDuplicates(threshold=0.8)
    nd.add("a", PAIR_A[0] + PAIR_A[1])
    assert nd.duplicate_of(PAIR_A[0].replace("Taking g", "Using g") + PAIR_A[1]) == "a"
    assert nd.duplicate_of(PAIR_B[0] + PAIR_B[1]) is None
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": BENCH_QUESTION, "answer": "7 pm"}) + "\n"
                     + json.dumps({"question": "求方程 x 加 三 等于 五 的解，并说明理由。", "choices": ["2"]}) + "\n")
    c = Contamination([str(bench)], n=13, n_cjk=12)
    words = BENCH_QUESTION.split()
    assert c.match("Consider this: " + " ".join(words[5:18]) + " and more.") == str(bench)
    assert c.match(" ".join(words[5:17])) is None  # 12 words: below the 13-gram
    assert c.match("题目：求方程x加三等于五的解，并说明理由。") == str(bench)  # short item, matched whole
    assert c.match(PAIR_A[0]) is None


def test_snippets_cut_at_paragraphs_then_sentences():
    text = "A" * 50 + ".\n\n" + ("Sentence one is here. " * 30) + "\n\n" + "tiny"
    parts = snippets(text, max_chars=200, min_chars=40, limit=10)
    assert all(40 <= len(p) <= 200 for p in parts) and parts[0].startswith("A" * 50)
    assert snippets(text, max_chars=200, min_chars=40, limit=2) == parts[:2]


def _pages(path, cases=CASES):
    with open(path, "w") as f:
        for case in cases:
            f.write(json.dumps({"id": case, "discipline": "physics",
                                "text": f"[[case:{case}]] {FILLER}"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def http_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synth_http")
    bench = tmp / "bench.jsonl"
    bench.write_text(json.dumps({"question": BENCH_QUESTION, "answer": "7 pm"}) + "\n")
    disciplines = load_disciplines(DISCIPLINES)
    seeds, skipped = read_seed_pages(_pages(tmp / "pages.jsonl"), disciplines)
    with FakeOpenAI() as srv:
        backend = OpenAIChatBackend(base_url=srv.url, model="fake-7b", api_key="s3cret",
                                    concurrency=4, timeout=0.8, max_retries=2, backoff=0.05)
        cfg = SynthConfig(output=str(tmp / "qa.jsonl"), benchmark_files=[str(bench)],
                          progress=False)
        report = run_synth(cfg, backend, disciplines, seeds, skipped)
    return dict(tmp=tmp, srv=srv, report=report, bench=bench, seeds=seeds)


def test_http_counts_at_every_filter(http_run):
    r = http_run["report"]
    assert r["this_run"] == {"requests": 10, "backend_errors": 1, **EXPECTED}
    assert r["total"] == EXPECTED and r["pending"] == 1  # the 400 is retried by the next run
    assert "HTTP 400" in r["backend_error_examples"][0]
    (failure,) = [json.loads(x) for x in
                  (http_run["tmp"] / "qa.jsonl.failures.jsonl").read_text().splitlines()]
    assert failure["key"] == "bad400#0#0" and "HTTP 400" in failure["error"]
    assert failure["attempts"] == 1
    assert json.loads((http_run["tmp"] / "qa.jsonl.report.json").read_text()) == r


def test_http_concurrency_retries_timeouts(http_run):
    srv = http_run["srv"]
    assert 2 <= srv.max_in_flight <= 4
    assert srv.attempts["flaky500"] == 2 and srv.attempts["slow"] == 2  # retried once each
    assert srv.attempts["bad400"] == 1  # a client error is not retried
    assert srv.auth == {"Bearer s3cret"}
    assert all(b["model"] == "fake-7b" and isinstance(b["seed"], int) for b in srv.bodies)


def test_http_output_records_have_provenance(http_run, tmp_path):
    records = [json.loads(line) for line in (http_run["tmp"] / "qa.jsonl").read_text().splitlines()]
    assert [r["seed_id"] for r in records] == ["good_a", "good_b", "flaky500", "slow"]
    for r in records:
        assert r["text"] == f"Problem: {r['problem']}\nSolution: {r['solution']}"
        assert r["discipline"] == "physics" and r["model"] == "fake-7b" and r["backend"] == "openai"
        assert r["key"] == f"{r['seed_id']}#0#0" and r["seed_source"].endswith(".jsonl:" + str(
            CASES.index(r["seed_id"]) + 1))
    assert records[1]["problem"] == PAIR_B[0]  # markdown answer parsed
    # the output is what preprocess_data reads
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from megasyne.data.indexed_dataset import IndexedDataset
    from megasyne.data.preprocess import PreprocessConfig, run_preprocess

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([r["text"] for r in records], trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tok.json"))
    run_preprocess(PreprocessConfig(inputs=[str(http_run["tmp"] / "qa.jsonl")],
                                    output_prefix=str(tmp_path / "synth"),
                                    tokenizer=str(tmp_path / "tok.json"), progress=False,
                                    metadata_keys=["discipline"], log_interval=0))
    assert IndexedDataset(tmp_path / "synth_text_document").num_documents == 4


def _tool(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "tools/synth_qa.py", *map(str, args)], cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_cli_killed_run_resumes_to_the_same_output(http_run, tmp_path):
    pages = _pages(tmp_path / "pages.jsonl", [c for c in CASES if c != "bad400"])
    out = tmp_path / "qa.jsonl"
    with FakeOpenAI() as srv:
        args = ["--pages", pages, "--output", out, "--openai-url", srv.url, "--model", "fake-7b",
                "--api-key-env", "FAKE_KEY", "--concurrency", 4, "--timeout", 0.8, "--retries", 2,
                "--backoff", 0.05, "--benchmark", http_run["bench"], "--no-progress"]
        killed = _tool(*args, "--debug-kill-after-responses", 3, env={"FAKE_KEY": "s3cret"},
                       check=False)
        assert killed.returncode == -9, killed.stderr[-3000:]
        answered = [json.loads(x)["key"] for x in
                    (tmp_path / "qa.jsonl.responses.jsonl").read_text().splitlines()]
        assert len(answered) == 3
        first_run = len(srv.bodies)
        done = _tool(*args, env={"FAKE_KEY": "s3cret"})
        assert "s3cret" not in done.stdout + done.stderr
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["answers_from_journal"] + report["items_done_before"] == 3
        assert report["this_run"]["requests"] == len(CASES) - 1 - 3 and report["pending"] == 0
        assert report["total"] == EXPECTED
        from megasyne.syne.synth.generators import _seed  # the seed each request carries

        assert not {_seed(k) for k in answered} & {b["seed"] for b in srv.bodies[first_run:]}
        changed = _tool(*args[:-1], "--samples", 2, check=False)  # other settings: refused
        assert changed.returncode == 2 and "samples_per_snippet" in changed.stderr
        assert changed.stderr.startswith("error: ") and changed.stderr.count("\n") == 1
    mine = [json.loads(line) for line in out.read_text().splitlines()]
    ref = [json.loads(line) for line in (http_run["tmp"] / "qa.jsonl").read_text().splitlines()]
    assert [(r["key"], r["problem"], r["solution"]) for r in mine] == \
        [(r["key"], r["problem"], r["solution"]) for r in ref]


def test_cli_bad_inputs_are_one_error_line_and_exit_2(tmp_path):
    pages = _pages(tmp_path / "pages.jsonl", ["good_a"])
    (tmp_path / "bench.json").write_text("{not json")
    base = ["--pages", pages, "--output", tmp_path / "qa.jsonl", "--no-progress"]
    cases = [
        (["--hf-model", tmp_path / "none"], f"--hf-model {tmp_path / 'none'}: no config.json"),
        (["--openai-url", "http://127.0.0.1:9/v1"], "--openai-url needs --model"),
        (["--openai-url", "http://127.0.0.1:9/v1", "--model", "m", "--concurrency", "0"],
         "need concurrency (--concurrency) >= 1"),
        (["--openai-url", "http://127.0.0.1:9/v1", "--model", "m", "--benchmark",
          tmp_path / "gone.jsonl"], f"benchmark file {tmp_path / 'gone.jsonl'}: cannot read it"),
        (["--openai-url", "http://127.0.0.1:9/v1", "--model", "m", "--benchmark",
          tmp_path / "bench.json"], f"benchmark file {tmp_path / 'bench.json'}: not JSON"),
    ]
    for extra, message in cases:
        proc = _tool(*base, *extra, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.startswith(f"error: {message}") and proc.stderr.count("\n") == 1, \
            proc.stderr[-3000:]
    assert not (tmp_path / "qa.jsonl").exists() and not (tmp_path / "qa.jsonl.run.json").exists()


def test_unreachable_server_is_a_counted_error():
    backend = OpenAIChatBackend(base_url="http://127.0.0.1:9/v1", model="m", max_retries=1,
                                backoff=0.01, timeout=2)
    (resp,) = backend.generate([Request(key="k", messages=[{"role": "user", "content": "hi"}])])
    assert resp.error and resp.attempts == 2 and "127.0.0.1:9" in resp.error


def test_seeds_from_a_topic_labelled_dataset(tmp_path):
    """Pages -> .bin/.idx (+ sidecar `topic` as label_topics writes it) -> seeds routed to
    disciplines, their text decoded back exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megasyne.data.metadata import write_metadata_field
    from megasyne.data.preprocess import PreprocessConfig, run_preprocess
    from megasyne.data.tokenizers import load_tokenizer
    from megasyne.syne.synth.pipeline import read_seed_dataset

    pages = [json.loads(x) for x in (REPO_ROOT / "examples/syne/data/science_pages.jsonl")
             .read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([p["text"] for p in pages], trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "pages.jsonl").write_text("".join(json.dumps({"text": p["text"]}) + "\n"
                                                  for p in pages))
    run_preprocess(PreprocessConfig(inputs=[str(tmp_path / "pages.jsonl")], log_interval=0,
                                    output_prefix=str(tmp_path / "web"),
                                    tokenizer=str(tmp_path / "tok.json"), progress=False))
    prefix = str(tmp_path / "web_text_document")
    topics = ["biology", "chemistry", "physics", "mathematics"]
    write_metadata_field(prefix, "topic", topics, categories=sorted(set(topics) | {"law_politics"}))
    seeds, skipped = read_seed_dataset(prefix, load_tokenizer(tmp_path / "tok.json"),
                                       load_disciplines(DISCIPLINES), lang="en", only=None)
    assert [s.discipline for s in seeds] == ["biology", "chemistry", "physics", "math"]
    assert [s.text for s in seeds] == [p["text"] for p in pages]
    assert seeds[2].id == "web_text_document#2" and skipped == {"no_discipline": 0,
                                                                "other_discipline": 0}
