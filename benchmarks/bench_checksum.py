"""Cost of checkpoint checksums on an 8B-sized TP shard file (megasyne/checkpoint/integrity.py).

A Llama-3-8B checkpoint at TP8 holds ~2 GB of bf16 weights per TP rank; with the fp32 master
weights and Adam moments of the distributed optimizer, each rank's share is larger (12 bytes per
parameter over DP). This writes one file of --gib GiB (random bytes, fsync'ed, like a fresh
shard), then times, side by side in one run: the write itself, xxh3_64 (what megasyne uses),
zlib.crc32 (the standard library's alternative) and a plain read, hot (in the page cache, as
right after the save) and, where the machine allows dropping the page cache, cold (as a
resume after a restart reads it). Prints one JSON object.

    python benchmarks/bench_checksum.py --gib 2 --dir /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import zlib

import numpy as np

from megasyne.checkpoint.integrity import file_digest, read_chunks


def _write(path: str, gib: float) -> float:
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, size=64 << 20, dtype=np.uint8).tobytes()  # 64 MiB
    total = int(gib * (1 << 30))
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < total:
            n = min(len(block), total - written)
            f.write(block[:n])
            written += n
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def _read_with(path: str, update) -> float:
    t0 = time.perf_counter()
    read_chunks(path, update)
    return time.perf_counter() - t0


def _drop_cache(path: str) -> bool:
    """Evict the file from the page cache (POSIX_FADV_DONTNEED after fsync); True if it worked."""
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    path = os.path.join(args.dir, "megasyne_checksum_bench.bin")
    size = int(args.gib * (1 << 30))
    try:
        out = {"file_gib": args.gib, "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "write_fsync_s": round(_write(path, args.gib), 3)}
        crc = [0]

        def crc_update(b):
            crc[0] = zlib.crc32(b, crc[0])

        ways = {"read_only": lambda b: None, "xxh3_64": None, "zlib_crc32": crc_update}
        for name in ways:
            hot = []
            for _ in range(args.reps):
                if name == "xxh3_64":
                    t0 = time.perf_counter()
                    file_digest(path)
                    hot.append(time.perf_counter() - t0)
                else:
                    hot.append(_read_with(path, ways[name]))
            out[f"{name}_hot_s"] = round(min(hot), 3)
            out[f"{name}_hot_gb_s"] = round(size / min(hot) / 1e9, 2)
            if _drop_cache(path):
                t0 = time.perf_counter()
                if name == "xxh3_64":
                    file_digest(path)
                else:
                    _read_with(path, ways[name])
                cold = time.perf_counter() - t0
                out[f"{name}_cold_s"] = round(cold, 3)
                out[f"{name}_cold_gb_s"] = round(size / cold / 1e9, 2)
        out["xxh3_over_write"] = round(out["xxh3_64_hot_s"] / out["write_fsync_s"], 3)
        print(json.dumps(out))
    finally:
        if os.path.exists(path):
            os.remove(path)


if __name__ == "__main__":
    main()
