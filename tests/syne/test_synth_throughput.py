"""tools/synth_qa.py at throughput: N requests always in flight, answers judged in item order
whatever order they come back in, retries (500, 503, 429 + Retry-After, stalls), failures kept
on record, and SIGKILLs at any point resumed without requesting an answered item again.

The loopback server is tests/syne/fake_openai.py; its ``gen`` pages get distinct answers, pages
of the same group near-duplicate ones (so the kept set depends on the judging order)."""

from __future__ import annotations

import email.utils
import json
import random
import subprocess
import sys
import time
import unicodedata

import pytest

from megasyne.syne.synth.filters import NearDuplicates, ngrams, normalise, units
from megasyne.syne.synth.generators import (
    MAX_DELAY,
    OpenAIChatBackend,
    _seed,
    retry_after_seconds,
)
from megasyne.syne.synth.pipeline import SynthConfig, read_seed_pages, run_synth
from megasyne.syne.synth.templates import load_disciplines
from tests.launch import REPO_ROOT
from tests.syne.fake_openai import CHAOS, FakeOpenAI

DISCIPLINES = load_disciplines(REPO_ROOT / "examples/syne/disciplines.yaml")
FILLER = ("Measurements of motion were made on an inclined plane with a water clock, and the "
          "distances covered in equal times grew as the odd numbers one, three, five and seven. "
          "The observers repeated each trial many times and recorded the results in a notebook.")


def _pages(path, cases, ids=None):
    ids = ids or [f"p{i:02d}" for i in range(len(cases))]
    path.write_text("".join(json.dumps({"id": i, "discipline": "physics",
                                        "text": f"[[case:{c}]] {FILLER}"}) + "\n"
                            for i, c in zip(ids, cases)))
    return str(path)


# 40 items: groups 0..29, every third page repeats the previous group (a near duplicate),
# one page whose server never recovers
GEN = [f"gen:{i - 1 if i % 3 == 2 else i}" for i in range(39)]
GEN.insert(17, "down503")


def _run(tmp, srv, *, concurrency, timeout=5.0, retries=3, name="qa"):
    seeds, skipped = read_seed_pages(_pages(tmp / f"{name}.pages.jsonl", GEN), DISCIPLINES)
    backend = OpenAIChatBackend(base_url=srv.url, model="fake", concurrency=concurrency,
                                timeout=timeout, max_retries=retries, backoff=0.02)
    out = tmp / f"{name}.jsonl"
    report = run_synth(SynthConfig(output=str(out), progress=False), backend, DISCIPLINES,
                       seeds, skipped)
    return report, out


def _kept(out):
    return [(r["key"], r["problem"], r["solution"]) for r in map(json.loads,
                                                                 out.read_text().splitlines())]


def _state(out):
    return [json.loads(x) for x in out.with_name(out.name + ".state.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One request at a time to a well-behaved server: answers arrive in item order."""
    tmp = tmp_path_factory.mktemp("synth_ref")
    with FakeOpenAI(delay=0.005) as srv:
        report, out = _run(tmp, srv, concurrency=1, retries=1)
    # 13 pages repeat a group (Jaccard ~0.9); MinHash LSH at 0.8 catches most, not all
    dups = report["this_run"]["near_duplicate"]
    assert dups >= 10 and report["kept_total"] == 39 - dups
    return dict(kept=_kept(out), state=_state(out), report=report)


def test_misbehaving_server_gives_the_same_kept_set(reference, tmp_path):
    with FakeOpenAI(delay=0.05, chaos=True, slow=0.7, retry_after=0.15) as srv:
        report, out = _run(tmp_path, srv, concurrency=8, timeout=0.4)
    assert _kept(out) == reference["kept"] and _state(out) == reference["state"]
    assert report["total"] == reference["report"]["total"]
    assert srv.max_in_flight == 8  # reached, never passed
    # every kind of trouble happened and was retried
    statuses = {}
    for e in srv.log:
        if e["case"] == "gen":
            statuses.setdefault(e["seed"], []).append(e.get("status"))
    modes = {CHAOS[s % 5] for s, st in statuses.items() if st[0] != 200 and len(st) > 1}
    assert modes == {"500", "503", "429", "stall"}
    # the answers came back out of item order (the journal is in arrival order)
    arrived = [json.loads(x)["key"] for x in
               out.with_name("qa.jsonl.responses.jsonl").read_text().splitlines()]
    assert arrived != sorted(arrived) and sorted(arrived) == [s["key"] for s in _state(out)]
    # Retry-After was waited for: a 429's next attempt starts at least 0.15 s after it
    by_seed: dict[int, list] = {}
    for e in srv.log:
        by_seed.setdefault(e["seed"], []).append(e)
    waits = [tries[1]["start"] - tries[0]["end"] for s, tries in by_seed.items()
             if tries[0].get("status") == 429]
    assert waits and min(waits) >= 0.15 - 0.01
    # the failure is on record, the batch around it is not lost
    (failure,) = [json.loads(x) for x in out.with_name("qa.jsonl.failures.jsonl").read_text()
                  .splitlines()]
    assert failure["key"] == "p17#0#0" and failure["attempts"] == 4 and "HTTP 503" in failure["error"]
    assert report["pending"] == 1 and report["this_run"]["backend_errors"] == 1


def _tool(*args, check=True):
    proc = subprocess.run([sys.executable, "tools/synth_qa.py", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_killed_twice_resumes_without_asking_again(reference, tmp_path):
    """SIGKILL after 10 answers while the first item stalls (answers wait unjudged), again after
    12 more (judged, but state lines not yet synced), then a full run: no answered item is
    requested again and the output equals the reference."""
    pages = _pages(tmp_path / "pages.jsonl", ["slow"] + GEN,  # ids as the reference's
                   ids=["a_slow"] + [f"p{i:02d}" for i in range(len(GEN))])
    out = tmp_path / "qa.jsonl"
    journal = tmp_path / "qa.jsonl.responses.jsonl"
    with FakeOpenAI(delay=0.05, slow=4.0) as srv:  # the first item stalls past 10 answers
        args = ["--pages", pages, "--output", out, "--openai-url", srv.url, "--model", "fake",
                "--concurrency", 4, "--timeout", 3, "--retries", 3, "--backoff", 0.02,
                "--no-progress"]
        answered: set[str] = set()
        for kill in (10, 12, None):
            before = len(srv.log)
            extra = [] if kill is None else ["--debug-kill-after-responses", kill]
            proc = _tool(*args, *extra, check=kill is None)
            if kill is not None:
                assert proc.returncode == -9, proc.stderr[-3000:]
            asked = {e["seed"] for e in srv.log[before:]}
            assert not asked & {_seed(k) for k in answered}, "an answered item was requested again"
            answered = {json.loads(x)["key"] for x in journal.read_text().splitlines()}
            if kill == 10:
                assert len(answered) == 10 and "a_slow#0#0" not in answered  # stalled first item
                assert not (tmp_path / "qa.jsonl.state.jsonl").exists() or not _state(out)
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    # the 22 answers of the killed runs were judged then (state on disk) or now, from the journal
    assert report["answers_from_journal"] + report["items_done_before"] == 22
    assert report["this_run"]["requests"] == len(GEN) + 1 - 22 and report["pending"] == 1
    kept = _kept(out)
    assert kept[0][0] == "a_slow#0#0" and kept[1:] == reference["kept"]


def test_retry_after_and_backoff_delays():
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("0") == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28.5 <= retry_after_seconds(date, now=now) <= 30.0
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    backend = OpenAIChatBackend(base_url="http://127.0.0.1:9/v1", model="m", backoff=0.5)
    assert backend._delay(0, "3") == 3.0 and backend._delay(0, "600") == MAX_DELAY
    draws = [backend._delay(2, None) for _ in range(200)]  # 0.5 * 2**2 = 2 s, +-25%
    assert 1.5 <= min(draws) < 1.6 and 2.4 < max(draws) <= 2.5
    assert backend._delay(20, None) == MAX_DELAY


def test_fast_normalise_and_minhash_equal_the_plain_versions():
    def plain_normalise(text):
        text = unicodedata.normalize("NFKC", text).lower()
        text = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
        return " ".join(text.split())

    rng = random.Random(0)
    for _ in range(500):
        text = "".join(chr(rng.randrange(0, 0x3100)) for _ in range(120))
        assert normalise(text) == plain_normalise(text)
    from datasketch import MinHash

    nd = NearDuplicates()
    for text in ("The quick brown fox jumps over the lazy dog again and again, said she.",
                 "问题：一个小球以每秒十四点七米的速度竖直上抛，多久到达最高点？"):
        fresh = MinHash(num_perm=128, seed=1)
        fresh.update_batch([" ".join(g).encode() for g in ngrams(units(text), 5)])
        assert (nd._signature(text).hashvalues == fresh.hashvalues).all()
