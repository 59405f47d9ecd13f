"""torchrun worker for test_label_dist.py (2 ranks, gloo): runs ``tools/label_topics.py`` main()
once per argument list (lists separated by ``--``), as the command line would under torchrun.

Usage: label_worker.py OUT_JSON ARGS... [-- ARGS...]
Each rank writes ``OUT_JSON.<rank>``: the exit code and printed lines of every run, rewritten
after each run so that a last run that kills the job (``--debug-kill-after-blocks``) leaves the
results of the runs before it. The process group is joined once, here, with the tool's own
``init_distributed`` (a group destroyed and created again in one process under torchrun meets the
first one's keys in the launcher's store and hangs); the tool then uses that group and leaves it
alone.
"""

import contextlib
import importlib.util
import io
import sys

import torch.distributed

from megasyne.atomic import atomic_write_json
from megasyne.syne.labeling import init_distributed
from tests.launch import REPO_ROOT


def main(out: str, argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("label_topics", REPO_ROOT / "tools/label_topics.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    runs, current = [], []
    for a in [*argv, "--"]:
        if a == "--":
            runs.append(current)
            current = []
        else:
            current.append(a)
    rank, world, owns = init_distributed()
    assert (world, owns) == (2, True), (world, owns)
    results = []
    for args in runs:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            rc = tool.main(args)
        results.append({"rc": rc, "stdout": printed.getvalue()})
        atomic_write_json(f"{out}.{rank}", results)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
