"""The pretraining loader reading ``s3://`` against reading the same shards from local files.

One run measures ``pretrain.data.build_loader`` (workers read and decode; no augmentation,
which on a GPU runs on the device) on the phantom dataset of ``loader_throughput.py``:

- local       -- the prepared folder on disk;
- s3          -- the same files uploaded to moto's S3 server (``tests/s3_support.py``) on
                 127.0.0.1, read with ranged GETs;
- s3 +20 ms   -- the same through ``FaultProxy``, which holds every request back 20 ms
                 (``--latency``) before forwarding it;

each with 1 and 2 workers, the S3 rows with ``read_ahead`` 1 (one GET at a time per
worker) and the default (8 in flight per worker). Views/s as in ``loader_throughput.py``:
2 per slice delivered; median and spread of 3 timed runs, and over the whole row (worker
start-up, manifest and index reads included). Per row also: ranged data reads/s and KiB
per read (one GET each on the store; counted in the workers; index files not included),
HTTP requests/s the proxy forwarded, and CPU cores used by the loader (this process, the
proxy's threads included, and its workers), by the moto server (its own process, one
Python interpreter: about one core at most) and by every other process on the machine
(a row with such load is flagged as disturbed). The design's target: s3 +20 ms >= 0.9x
local views/s. Example (CPU, about a minute on 2 cores, the dataset made first)::

    python benchmarks/loader_s3.py --work /tmp/medssl-loader
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing import Value
from pathlib import Path

import torch

# Run as a script, this folder is on sys.path: the shared timing helper lives beside it
from timing import timed_runs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.s3_support, when run as a script

import data_prep.shard_reader as shard_reader  # noqa: E402
from cluster.storage import join  # noqa: E402
from cluster.storage.objects import upload  # noqa: E402
from pretrain.config import DataConfig  # noqa: E402
from pretrain.data import Stretch, build_loader, pretrain_epoch_samples  # noqa: E402
from tests.s3_support import (  # noqa: E402
    FaultProxy,
    FaultSchedule,
    environment,
    s3_environment,
    upload_tree,
)

TARGET = 0.9  # the design's s3-with-latency / local views/s
BUSY_SERVER = 0.85  # server CPU (cores) from which the server is called the bottleneck
OTHER_LOAD = 0.2  # cores used by other processes from which a row is called disturbed
MIN_CPU_WINDOW = 1.0  # seconds: shorter, clock-tick CPU counts say nothing
DEFAULT_READ_AHEAD = DataConfig().read_ahead
REPEATS = 3
_TICK = os.sysconf("SC_CLK_TCK")
# Ranged reads and their bytes, counted in the DataLoader workers (forked: they share these)
_READS, _BYTES = Value("q", 0), Value("q", 0)
_read_range = shard_reader.read_range


def _counted_read_range(location: str, start: int, end: int) -> bytes:
    data = _read_range(location, start, end)
    with _READS.get_lock():
        _READS.value += 1
        _BYTES.value += len(data)
    return data


shard_reader.read_range = _counted_read_range  # type: ignore[assignment]


@dataclass
class Row:
    source: str  # local, s3, s3 +N ms
    workers: int
    read_ahead: int
    rates: list[float]  # views/s of each timed repeat
    whole_row: float  # views/s from building the loader to its last batch
    reads_per_s: float  # ranged data reads (GETs on a store) at the median rate
    kib_per_read: float
    http_per_s: float | None  # requests the proxy forwarded (proxied rows), median rate
    # CPU over the timed batches, cores (None when they took under MIN_CPU_WINDOW):
    loader_cores: float | None  # this process (proxy threads too) and its loader workers
    server_cores: float | None  # the moto server process (0 for local rows)
    other_cores: float | None  # every other process on the machine: load not ours
    cpu_ms_per_100: float | None  # loader and server CPU per 100 views

    @property
    def views_per_s(self) -> float:
        return statistics.median(self.rates)


class MotoServer:
    """``tests.s3_support.S3Server`` in a child process (its CPU measured apart from
    the loader's), with one bucket; it also ends when this process does (stdin closes)."""

    def __init__(self) -> None:
        script = ("import logging, sys; from tests.s3_support import S3Server; "
                  "logging.getLogger('werkzeug').setLevel(logging.ERROR); s = S3Server(); "
                  "print(s.port, s.new_bucket(), flush=True); sys.stdin.read(); s.stop()")
        self.process = subprocess.Popen(
            [sys.executable, "-c", script], cwd=REPO, text=True, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **s3_environment("http://127.0.0.1:1")})  # no other host
        assert self.process.stdout is not None
        port, self.bucket = self.process.stdout.readline().split()
        self.port = int(port)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()  # nothing to keep: quicker than the server's own stop
        self.process.wait(timeout=30)


def _stat(pid: int | str) -> tuple[int, float]:
    """(parent pid, CPU seconds used) of a process; (-1, 0) if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1, 0.0
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def cpu_seconds(server: int | None) -> tuple[float, float, float]:
    """CPU seconds so far of (this process and its children but the server, the server,
    the whole machine's busy cores)."""
    ours, served = _stat(os.getpid())[1], 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent, used = _stat(entry.name)
            if int(entry.name) == server:
                served = used
            elif parent == os.getpid():
                ours += used
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return ours, served, (sum(values) - values[3] - values[4]) / _TICK  # less idle, iowait


def batches(location: str, workers: int, read_ahead: int,
            args: argparse.Namespace) -> Iterator[torch.Tensor]:
    """The loader over exactly the batches the row takes, as ``loader_throughput.py``."""
    count = args.warmup + args.timed
    samples = count * args.batch
    yield from build_loader(location, seed=0, epoch=0, rank=0,
                            stretch=Stretch(world_size=1, micro_batch=args.batch,
                                            workers=workers, block=args.shuffle_buffer,
                                            batches=count),
                            epoch_samples=samples,
                            resampled=samples > pretrain_epoch_samples(location, 0),
                            read_ahead=read_ahead)


def measure(source: str, workers: int, read_ahead: int, location: str,
            args: argparse.Namespace, proxy: FaultProxy | None = None,
            server: int | None = None) -> Row:
    """Views/s of each timed repeat; reads and requests per batch over the whole row (a
    block's reads come in a burst), given at the median rate; CPU over the timed batches."""
    print(f"measuring {source}, {workers} worker(s), read_ahead {read_ahead} ...", flush=True)
    reads, nbytes, http = _READS.value, _BYTES.value, proxy.requests if proxy else 0
    begin = time.perf_counter()
    pairs = batches(location, workers, read_ahead, args)
    for _ in range(args.warmup):
        next(pairs)
    before = cpu_seconds(server)
    chunk = max(1, args.timed // REPEATS)  # as loader_throughput.py: 3 runs share --timed
    seconds = timed_runs(lambda: next(pairs), chunk, 0, min(REPEATS, args.timed),
                         torch.device("cpu"))
    ours, served, busy = (end - start for end, start in zip(cpu_seconds(server), before))
    for _ in pairs:  # the rest, so that every read the row planned is counted
        pass
    count = args.warmup + args.timed
    whole = 2 * args.batch * count / (time.perf_counter() - begin)
    rates = [2 * args.batch * chunk / s for s in seconds]
    per_batch = statistics.median(rates) / (2 * args.batch) / count  # row totals -> /s
    reads, nbytes = _READS.value - reads, _BYTES.value - nbytes
    wall = sum(seconds)
    cpu = [ours / wall, served / wall, max(0.0, busy - ours - served) / wall,
           1e5 * (ours + served) / (2 * args.batch * chunk * len(seconds))]
    return Row(source, workers, read_ahead, rates, whole, reads * per_batch,
               nbytes / max(reads, 1) / 1024,
               (proxy.requests - http) * per_batch if proxy else None,
               *(cpu if wall >= MIN_CPU_WINDOW else [None] * 4))


def run_all(data: Path, args: argparse.Namespace) -> list[Row]:
    """Every row, in one run against one server."""
    latency = f"s3 +{1000 * args.latency:.0f} ms"
    rows = [measure("local", w, DEFAULT_READ_AHEAD, str(data), args) for w in args.workers]
    server = MotoServer()
    with ExitStack() as stack:
        stack.callback(server.stop)
        stack.enter_context(environment(s3_environment(server.endpoint)))
        print(f"uploading {data} to the S3 server ...", flush=True)
        remote = join(f"s3://{server.bucket}", "datasets", data.name)
        upload(data / "manifest.json", join(remote, "manifest.json"))  # all the loader reads
        upload_tree(data / "shards", join(remote, "shards"))
        for workers in args.workers:
            for depth in args.read_ahead:
                rows.append(measure("s3", workers, depth, remote, args,
                                    server=server.process.pid))
        proxy = FaultProxy(server.port, FaultSchedule(latency=args.latency))
        stack.callback(proxy.close)
        with environment({"AWS_ENDPOINT_URL": proxy.endpoint}):
            for workers in args.workers:
                for depth in args.read_ahead:
                    rows.append(measure(latency, workers, depth, remote, args, proxy,
                                        server.process.pid))
    return rows


def reference(row: Row, rows: list[Row], source: str) -> Row | None:
    """The row of ``source`` to compare ``row`` with (same workers; the S3 one also the
    same read-ahead)."""
    return next((r for r in rows if r.source == source and r.workers == row.workers and
                 (source == "local" or r.read_ahead == row.read_ahead)), None)


def ratios(row: Row, rows: list[Row]) -> tuple[float | None, float | None]:
    """Views/s over local's, and (rows with added latency) over the direct S3 row's."""
    local = reference(row, rows, "local")
    direct = reference(row, rows, "s3") if row.source.startswith("s3 +") else None
    return (None if local is None else row.views_per_s / local.views_per_s,
            None if direct is None else row.views_per_s / direct.views_per_s)


def print_table(rows: list[Row]) -> None:
    print("| source | workers | read_ahead | views/s (median, slowest-fastest) | vs local | "
          "vs s3 | views/s, whole row | reads/s | KiB/read | HTTP req/s (proxy) | "
          "CPU cores: loader | server | other processes | CPU ms/100 views |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cell(value: float | None, form: str) -> str:
        return "" if value is None else format(value, form)

    for r in rows:
        local, direct = ratios(r, rows)
        print(f"| {r.source} | {r.workers} | {r.read_ahead} | {r.views_per_s:.1f} "
              f"({min(r.rates):.1f}-{max(r.rates):.1f}) | {cell(local, '.2f')} | "
              f"{cell(direct, '.2f')} | {r.whole_row:.1f} | {r.reads_per_s:.1f} | "
              f"{r.kib_per_read:.0f} | {cell(r.http_per_s, '.0f')} | "
              f"{cell(r.loader_cores, '.2f')} | {cell(r.server_cores, '.2f')} | "
              f"{cell(r.other_cores, '.2f')} | {cell(r.cpu_ms_per_100, '.1f')} |")


def verdicts(rows: list[Row]) -> list[str]:
    lines, cores = [], os.cpu_count() or 1
    for r in rows:
        what = f"{r.source}, {r.workers} worker(s), read_ahead {r.read_ahead}"
        local, direct = ratios(r, rows)
        if r.source.startswith("s3 +") and local is not None:
            lines.append(f"{what}: {local:.2f}x local -> "
                         f"{'meets' if local >= TARGET else 'below'} the target (>= {TARGET}x)"
                         + ("" if direct is None else f"; {direct:.2f}x s3 without the "
                            "added latency"))
        if r.loader_cores is None or r.server_cores is None or r.other_cores is None:
            continue
        busy = r.loader_cores + r.server_cores + r.other_cores
        if r.other_cores >= OTHER_LOAD:  # first: it also explains the rest
            lines.append(f"{what}: disturbed, other processes used {r.other_cores:.2f} "
                         "cores meanwhile")
        elif r.server_cores >= BUSY_SERVER:
            lines.append(f"{what}: the moto server used {r.server_cores:.2f} cores (one "
                         "Python process): it, not the loader, is the bottleneck")
        elif busy >= 0.9 * cores:
            lines.append(f"{what}: CPU-bound, the {cores} cores {100 * busy / cores:.0f}% "
                         f"busy (loader {r.loader_cores:.2f}, server {r.server_cores:.2f})")
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="prepared dataset (default: make a phantom one)")
    parser.add_argument("--work", default=None, help="folder for the phantom dataset (reused)")
    parser.add_argument("--patients", type=int, default=4, help="phantom patients")
    parser.add_argument("--image-size", type=int, default=256, help="phantom slice size, px")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=8, help="untimed batches per row")
    parser.add_argument("--timed", type=int, default=96, help="timed batches per row")
    parser.add_argument("--read-ahead", type=int, nargs="+", default=[1, DEFAULT_READ_AHEAD],
                        help="reads in flight per worker for the S3 rows (local: "
                             f"{DEFAULT_READ_AHEAD}, the default)")
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--latency", type=float, default=0.02,
                        help="seconds the proxy adds to every request")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # the main process only collects batches
    work = Path(args.work or tempfile.mkdtemp(prefix="medssl-loader-s3-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else work / f"prepared_{args.image_size}"
    if not args.data and not (data / "manifest.json").is_file():
        # the other loader benchmarks' phantom, made there (a heavy import: only if needed)
        from pretrain_throughput import make_dataset

        data = make_dataset(work, args.image_size, args.patients)
    start = time.perf_counter()
    rows = run_all(data, args)
    print(f"\nloader from S3 vs local files on CPU ({os.cpu_count()} cores): {data}, batch "
          f"{args.batch}, block {args.shuffle_buffer}, {args.warmup} warm-up + {args.timed} "
          f"timed batches per row, read + decode only (2 views per slice); moto's S3 server "
          f"on 127.0.0.1 in its own process; measured in {time.perf_counter() - start:.0f} s\n")
    print_table(rows)
    lines = verdicts(rows)
    print("\n" + "\n".join(lines))
    print(json.dumps({
        "batch": args.batch, "latency_s": args.latency, "default_read_ahead": DEFAULT_READ_AHEAD,
        "rows": [{"source": r.source, "workers": r.workers, "read_ahead": r.read_ahead,
                  "views_per_s": round(r.views_per_s, 1),
                  "views_per_s_range": [round(min(r.rates), 1), round(max(r.rates), 1)],
                  **{name: None if value is None else round(value, 3) for name, value in
                     zip(("vs_local", "vs_s3"), ratios(r, rows))},
                  "whole_row_views_per_s": round(r.whole_row, 1),
                  "reads_per_s": round(r.reads_per_s, 1), "kib_per_read": round(r.kib_per_read, 1),
                  "http_per_s": None if r.http_per_s is None else round(r.http_per_s, 1),
                  **{name: None if value is None else round(value, 2) for name, value in (
                      ("loader_cores", r.loader_cores), ("server_cores", r.server_cores),
                      ("other_cores", r.other_cores),
                      ("cpu_ms_per_100_views", r.cpu_ms_per_100))}} for r in rows],
        "verdicts": lines,
    }))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
