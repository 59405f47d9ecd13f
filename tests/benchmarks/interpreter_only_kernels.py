"""Two Triton kernels with bugs the interpreter runs through and the GPU compiler rejects
(for tests/benchmarks/test_kernel_resources.py): run as ``python THIS {interpret|compile}``."""

import json
import os
import sys

MODE = sys.argv[1]
os.environ["TRITON_INTERPRET"] = "1" if MODE == "interpret" else "0"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def double(x):  # the @triton.jit was forgotten: plain Python, fine for the interpreter
    return x * 2


@triton.jit
def calls_plain_python(x_ptr):
    offs = tl.arange(0, 16)
    tl.store(x_ptr + offs, double(tl.load(x_ptr + offs)))


@triton.jit
def loop_changes_type(x_ptr, n):
    acc = 0  # int before the loop, fp32 inside it
    for i in range(0, n):
        acc += tl.load(x_ptr + i)
    tl.store(x_ptr, acc)


@triton.jit
def fine(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)


LAUNCHES = {
    "calls_plain_python": lambda x: calls_plain_python[(1,)](x),
    "loop_changes_type": lambda x: loop_changes_type[(1,)](x, 16),
    "fine": lambda x: fine[(1,)](x, BLOCK=16),
}

result = {}
if MODE == "compile":
    from tests.scripts import load_script  # the test puts the repository on PYTHONPATH

    rec = load_script("benchmarks/kernel_resources.py").Recorder(90)
    rec.install()
for name, launch in LAUNCHES.items():
    x = torch.ones(16)
    try:
        launch(x)
        result[name] = {"ok": True, "x0": float(x[0])}
    except Exception as err:  # noqa: BLE001 - the test reads which ones failed
        result[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
if MODE == "compile":
    result["records"] = {r.kernel: {"error": r.error, "regs": r.regs} for r in rec.records}
print(json.dumps(result))
