"""A loopback OpenAI-compatible chat server for the synth_qa tests (standard library only).

Each seed page of the tests carries a marker ``[[case:NAME]]`` in its text; the prompt holds the
snippet, so the server finds the marker and answers as that case says. It records how many
requests were in flight at once and how many attempts each case took.
"""

from __future__ import annotations

import json
import re
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


class FakeOpenAI:
    """``with FakeOpenAI() as srv: srv.url`` -> http://127.0.0.1:PORT/v1"""

    def __init__(self, delay: float = 0.15, slow: float = 1.5) -> None:
        self.delay, self.slow = delay, slow
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.attempts: dict[str, int] = {}
        self.bodies: list[dict] = []
        self.auth: set[str | None] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.bodies.append(body)
                    server.auth.add(self.headers.get("Authorization"))
                try:
                    self._answer(body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body):
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "no such path"})
                text = "\n".join(m["content"] for m in body["messages"])
                m = re.search(r"\[\[case:(\w+)\]\]", text)
                case = m.group(1) if m else "good_a"
                with server.lock:
                    n = server.attempts[case] = server.attempts.get(case, 0) + 1
                time.sleep(server.delay)
                if case == "flaky500" and n % 2 == 1:
                    return self._send(503, {"error": "overloaded"})
                if case == "slow" and n % 2 == 1:
                    time.sleep(server.slow)  # longer than the client's timeout
                if case == "bad400":
                    return self._send(400, {"error": "context length exceeded"})
                content = {"flaky500": pair(*PAIR_C), "slow": pair(*PAIR_D),
                           "toolong": pair(*PAIR_B)[:80]}.get(case) or CASES[case]
                finish = "length" if case == "toolong" else "stop"
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": finish,
                                              "message": {"role": "assistant", "content": content}}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
