#!/usr/bin/env python
"""Throughput of tools/synth_qa.py's HTTP path against the loopback fake server.

The fake OpenAI-compatible server (tests/syne/fake_openai.py) runs in its own process and
answers every request after a fixed delay (default 50 ms), so the ideal rate at N requests in
flight is N / delay. Each setting runs the whole pipeline (``run_synth``: prompts, requests,
parsing, validation, MinHash near-duplicates, the output and state files) on fresh seed pages
whose answers are all distinct and kept, and reports requests per second of wall time and the
most requests the server saw in flight at once::

    PYTHONPATH=$PWD python benchmarks/bench_synth_qa.py [--delay 0.05] [--concurrency 1 8 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILLER = ("Measurements of motion were made on an inclined plane with a water clock, and the "
          "distances covered in equal times grew as the odd numbers one, three, five and seven. "
          "The observers repeated each trial many times and recorded the results in a notebook.")


def bench(url: str, n: int, items: int, work: Path) -> dict:
    from megasyne.syne.synth.generators import OpenAIChatBackend
    from megasyne.syne.synth.pipeline import SynthConfig, read_seed_pages, run_synth
    from megasyne.syne.synth.templates import load_disciplines

    disciplines = load_disciplines(ROOT / "examples/syne/disciplines.yaml")
    pages = work / f"pages_{n}.jsonl"
    pages.write_text("".join(json.dumps({"id": f"p{i}", "discipline": "physics",
                                         "text": f"[[case:gen:{i}]] {FILLER}"}) + "\n"
                             for i in range(items)))
    seeds, skipped = read_seed_pages(str(pages), disciplines)
    backend = OpenAIChatBackend(base_url=url, model="fake", concurrency=n, timeout=30,
                                max_retries=2, backoff=0.1)
    cfg = SynthConfig(output=str(work / f"qa_{n}.jsonl"), progress=False)
    urllib.request.urlopen(url + "/stats").read()  # resets the server's counters
    t0 = time.perf_counter()
    report = run_synth(cfg, backend, disciplines, seeds, skipped)
    seconds = time.perf_counter() - t0
    stats = json.loads(urllib.request.urlopen(url + "/stats").read())
    assert report["kept_total"] == items, report
    return {"concurrency": n, "items": items, "seconds": round(seconds, 3),
            "requests_per_s": round(report["this_run"]["requests"] / seconds, 1),
            "max_in_flight": stats["max_in_flight"], "server_requests": stats["requests"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay", type=float, default=0.05, help="server seconds per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--seconds", type=float, default=3.0,
                    help="items per setting: this many seconds of ideal throughput (at least 50)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    import datasketch  # noqa: F401  (imported by the first run otherwise, inside its timing)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen([sys.executable, "-m", "tests.syne.fake_openai", "--delay",
                               str(args.delay)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.concurrency:
                items = max(50, int(args.seconds * n / args.delay))
                rows.append(bench(url, n, items, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.kill()
        server.wait()
    print(f"\nfake server delay {args.delay * 1000:.0f} ms; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print("| in flight (N) | items | seconds | requests/s | ideal (N / delay) | of ideal | max in flight seen |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ideal = r["concurrency"] / args.delay
        print(f"| {r['concurrency']} | {r['items']} | {r['seconds']:.2f} | {r['requests_per_s']:.1f} "
              f"| {ideal:.0f} | {r['requests_per_s'] / ideal:.0%} | {r['max_in_flight']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"delay": args.delay, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
