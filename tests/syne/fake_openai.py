"""A loopback OpenAI-compatible chat server for the synth_qa tests and benchmark (stdlib only).

Each seed page of the tests carries a marker ``[[case:NAME]]`` in its text; the prompt holds the
snippet, so the server finds the marker and answers as that case says. ``[[case:gen:G]]`` answers
a pair made from the number G (pages of one G get near-duplicate pairs). With ``chaos=True`` the
first attempt of every ``gen`` request misbehaves as its ``seed`` says (500, 503, 429 with
Retry-After, or a stall past the client's timeout) and the delay varies per request, so answers
come back out of order. The server records how many requests were in flight at once, how many
attempts each case took, and a log of every request (its ``seed``, case, status, start and end).

As a separate process (for the benchmark: the server then does not share the client's GIL)::

    python -m tests.syne.fake_openai --delay 0.05     # prints the URL, serves until killed
"""

from __future__ import annotations

import argparse
import json
import random
import re
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAIR_A = ("A ball is thrown straight up at 14.7 m/s. Taking g = 9.8 m/s^2 and ignoring air "
          "resistance, how long does it take to reach its highest point?",
          "At the top the velocity is zero, so v = u - g t gives 0 = 14.7 - 9.8 t and t = 1.5 s. "
          "The ball reaches its highest point after 1.5 seconds.")
PAIR_B = ("How many moles of water are produced when 4 moles of hydrogen gas burn completely "
          "in oxygen according to 2 H2 + O2 -> 2 H2O?",
          "The equation shows 2 moles of H2 give 2 moles of H2O, a 1:1 ratio. Therefore 4 moles of "
          "hydrogen produce 4 moles of water.")
PAIR_C = ("A population of bacteria doubles every 20 minutes. Starting from 500 cells, how many "
          "cells are there after 2 hours if nothing limits the growth?",
          "Two hours is 120 minutes, which is 6 doubling periods. The count is 500 * 2^6 = "
          "500 * 64 = 32000 cells after two hours.")
PAIR_D = ("What is the sum of the interior angles of a convex hexagon, and what is each angle "
          "when the hexagon is regular?",
          "A convex polygon with n sides has interior angles summing to (n - 2) * 180 degrees. For "
          "n = 6 this is 720 degrees, so each angle of a regular hexagon is 720 / 6 = 120 degrees.")
# A benchmark question the contaminated answer reuses word for word (written for these tests).
BENCH_QUESTION = ("A train leaves the station at 3 pm travelling at 60 miles per hour and a second "
                  "train leaves the same station at 4 pm travelling at 80 miles per hour on the same "
                  "track; at what time does the second train catch up with the first?")


def pair(p, s, style="plain"):
    if style == "markdown":
        return f"**Problem:** {p}\n\n**Solution:** {s}"
    return f"Problem: {p}\nSolution: {s}"


CASES = {
    "good_a": pair(*PAIR_A),
    "good_b": pair(*PAIR_B, style="markdown"),
    "dup_a": pair(PAIR_A[0].replace("Taking g", "Using g"), PAIR_A[1]),
    "contam": pair(BENCH_QUESTION, "The first train has a 60 mile head start and the second "
                   "closes the gap at 20 miles per hour, so it needs 3 hours: it catches up at 7 pm."),
    "noanswer": "Problem: " + PAIR_C[0],
    "zh_wrong": "问题：一个小球以每秒十四点七米的速度竖直上抛，多久到达最高点？\n解答：到达最高点时速度为零，"
                "由速度公式可得时间为一点五秒，所以小球一点五秒后到达最高点。",
}


_WORDS = ("mass length angle charge speed force energy volume area circle square prism cube "
          "river valley rock layer cell gene enzyme acid base salt metal gas pressure heat wave "
          "lens mirror orbit planet comet star moon tide current field coil spring lever pulley "
          "ramp wheel gear clock pendulum sample beaker flask balance ruler tank pipe pump valve").split()


def gen_pair(group: int, variant: int) -> str:
    """A problem + solution built from ``group``; ``variant`` changes only the last words, so
    pairs of one group are near duplicates of each other."""
    rng = random.Random(group)
    words = [rng.choice(_WORDS) for _ in range(80)]
    problem = (f"Problem set {group}: consider the " + " ".join(words[:40])
               + f" and find the missing quantity of case {variant}.")
    solution = ("Combine the " + " ".join(words[40:]) + f" step by step; the result is {group * 7}.")
    return pair(problem, solution)


# chaos: what the first attempt of a gen request does, by seed % 5
CHAOS = {0: "ok", 1: "500", 2: "503", 3: "429", 4: "stall"}


CODE_A = ("Given a string of lowercase letters, return the first character that appears exactly "
          "once in it, or an empty string when every character repeats.\nExample: \"leetcode\" -> \"l\"",
          "Count every character with a dictionary, then scan the string again and return the first "
          "character whose count is one.\n```python\ndef first_unique(s):\n    counts = {}\n"
          "    for c in s:\n        counts[c] = counts.get(c, 0) + 1\n    for c in s:\n"
          "        if counts[c] == 1:\n            return c\n    return ''\n```")
CODE_B = ("Given a list of integers, return the length of the longest run of consecutive equal "
          "values.\nExample: [1, 1, 2, 2, 2, 3] -> 3",
          "Walk through the list once, keeping the length of the current run and the best seen.\n"
          "```python\ndef longest_run(nums):\n    best = cur = 0\n    for i, x in enumerate(nums):\n"
          "        cur = cur + 1 if i and nums[i - 1] == x else 1\n        best = max(best, cur)\n"
          "    return best\n```")
# the problem statement of task 12 of the MBPP fixture (examples/eval/fixture/mbpp), reused
MBPP_COPY = "Write a function to find the second largest distinct number in a list."
CODE_CASES = {
    "code_good_a": pair(*CODE_A),
    "code_good_b": pair(*CODE_B, style="markdown"),
    "code_dup": pair(CODE_A[0].replace("Given a string", "For a string"), CODE_A[1]),
    "code_nocode": pair(CODE_B[0].replace("equal", "identical"),
                        "Keep a counter of the current run and the best run while walking the list "
                        "once; reset the counter whenever the value changes."),
    "code_syntax": pair("Given two sorted lists, return how many values appear in both of them, "
                        "counting each common value once.\nExample: [1, 2, 4] and [2, 4, 5] -> 2",
                        "Use two pointers.\n```python\ndef common(a, b)\n    return len(set(a) & set(b))\n```"),
    "code_contam": pair(MBPP_COPY + " Return None when the list has fewer than two distinct values.",
                        "Sort the distinct values.\n```python\ndef second_largest(nums):\n"
                        "    d = sorted(set(nums))\n    return d[-2] if len(d) > 1 else None\n```"),
}
CASES.update(CODE_CASES)


class FakeOpenAI:
    """``with FakeOpenAI() as srv: srv.url`` -> http://127.0.0.1:PORT/v1"""

    def __init__(self, delay: float = 0.15, slow: float = 1.5, chaos: bool = False,
                 retry_after: float = 0.2, port: int = 0) -> None:
        self.delay, self.slow, self.chaos, self.retry_after = delay, slow, chaos, retry_after
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.attempts: dict[str, int] = {}
        self.seed_attempts: dict[int, int] = {}
        self.log: list[dict] = []
        """One entry per request: seed, case, status, start, end (time.monotonic())."""
        self.bodies: list[dict] = []
        self.auth: set[str | None] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            # headers and body go out in two writes: with Nagle on, the body waits for the
            # client's delayed ACK (40 ms on Linux), which would dominate every request
            disable_nagle_algorithm = True

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                if self.path != "/v1/stats":
                    return self._send(404, {"error": "no such path"})
                with server.lock:  # read and reset (the benchmark asks once per setting)
                    stats = {"requests": len(server.log), "max_in_flight": server.max_in_flight}
                    server.log.clear()
                    server.max_in_flight = server.in_flight
                self._send(200, stats)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                entry = {"seed": body.get("seed"), "start": time.monotonic()}
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.bodies.append(body)
                    server.auth.add(self.headers.get("Authorization"))
                    server.log.append(entry)
                self._counted = True
                try:
                    entry["status"] = self._answer(body, entry)
                finally:
                    entry["end"] = time.monotonic()
                    self._done()

            def _done(self):
                # a request leaves the count just before its answer is written: the client may
                # start its next request as soon as it reads it, and must not be seen at N + 1
                if getattr(self, "_counted", False):
                    self._counted = False
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body, entry):
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "no such path"})
                text = "\n".join(m["content"] for m in body["messages"])
                m = re.search(r"\[\[case:(\w+)(?::(\d+))?\]\]", text)
                case = m.group(1) if m else "good_a"
                seed = int(body.get("seed") or 0)
                with server.lock:
                    n = server.attempts[case] = server.attempts.get(case, 0) + 1
                    k = server.seed_attempts[seed] = server.seed_attempts.get(seed, 0) + 1
                entry["case"] = case
                if case == "gen":
                    return self._gen(int(m.group(2) or 0), seed, k)
                time.sleep(server.delay)
                if case == "flaky500" and n % 2 == 1:
                    return self._send(503, {"error": "overloaded"})
                if case == "down503":  # never recovers: the client's retries run out
                    return self._send(503, {"error": "service unavailable"})
                if case == "err500" and n % 2 == 1:
                    return self._send(500, {"error": "internal error"})
                if case == "ratelimit" and n % 2 == 1:
                    return self._send(429, {"error": "rate limited"},
                                      {"Retry-After": str(server.retry_after)})
                if case == "slow" and n % 2 == 1:
                    time.sleep(server.slow)  # longer than the client's timeout
                if case == "bad400":
                    return self._send(400, {"error": "context length exceeded"})
                content = {"flaky500": pair(*PAIR_C), "slow": pair(*PAIR_D),
                           "err500": pair(*PAIR_C), "ratelimit": pair(*PAIR_D),
                           "toolong": pair(*PAIR_B)[:80]}.get(case) or CASES[case]
                return self._complete(content, "length" if case == "toolong" else "stop")

            def _gen(self, group, seed, attempt):
                # chaos: per-request delays from 0.5x to 1.5x, so answers return out of order
                delay = server.delay * (0.5 + (seed % 11) / 10) if server.chaos else server.delay
                time.sleep(delay)
                mode = CHAOS[seed % 5] if server.chaos and attempt == 1 else "ok"
                if mode in ("500", "503"):
                    return self._send(int(mode), {"error": "server error"})
                if mode == "429":
                    return self._send(429, {"error": "rate limited"},
                                      {"Retry-After": str(server.retry_after)})
                if mode == "stall" and not self._stall():
                    return None  # the client gave up (as vLLM does, stop counting it)
                return self._complete(gen_pair(group, seed % 1000), "stop")

            def _stall(self) -> bool:
                """Wait server.slow seconds (past the client's timeout); False as soon as the
                client closes the connection."""
                end = time.monotonic() + server.slow
                while time.monotonic() < end:
                    readable, _, _ = select.select([self.connection], [], [], 0.01)
                    if readable and not self.connection.recv(1, socket.MSG_PEEK):
                        return False
                return True

            def _complete(self, content, finish):
                return self._send(200, {"id": "x", "object": "chat.completion",
                                        "model": "fake", "choices": [{
                                            "index": 0, "finish_reason": finish,
                                            "message": {"role": "assistant", "content": content}}]})

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self._done()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass
                return code

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024  # listen backlog: 64+ clients connect at once
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> int:
    ap = argparse.ArgumentParser(description="a fake OpenAI-compatible server on loopback")
    ap.add_argument("--delay", type=float, default=0.05, help="seconds per request")
    ap.add_argument("--chaos", action="store_true")
    args = ap.parse_args()
    srv = FakeOpenAI(delay=args.delay, chaos=args.chaos)
    print(srv.url, flush=True)
    srv.httpd.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
