#!/usr/bin/env python
"""Volume upload/download throughput through cloudmodal's volume engine, beside boto3's transfer manager,
to the same S3 endpoint (moto's server in a subprocess on this machine), in the same run.

For one file of ``--size`` MiB (random bytes), median of ``--repeat`` runs each:

  boto3            ``s3.upload_file`` / ``s3.download_file`` with the default ``TransferConfig`` (8 MiB parts,
                   10 threads): the reference
  engine           ``VolumeData.batch().put_file(path)`` + ``commit()`` (parts of ``--part-size`` MiB, sha256 per
                   part, manifest write and head swap included) / ``VolumeData.read_file`` streamed into a
                   local file (every part's checksum verified; no cache, so each run downloads)
  obstore          the library under the engine alone: ``obstore.put`` of the file (multipart) and
                   ``obstore.get`` streamed to a file — what the engine's own work costs on top

Each phase reports MB/s (10^6 bytes per second) and its ratio to boto3's, plus the CPU seconds moto's server
spent (on a 2-core machine the fake shares the CPU with the client: the figures are a comparison between
clients on one endpoint, not a measure of S3). Each round starts a fresh moto server, so no round pays for
the data the previous ones left in it.

    .venv/bin/python bench/volume_io.py                   # 256 MiB x 5, ~2 min on 2 cores
    .venv/bin/python bench/volume_io.py --size 64 --repeat 1 --json out.json

Nothing here asserts a timing; this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cloudmodal.volumes import FileHead, VolumeData, open_store  # noqa: E402
from tests.volumes.servers import Server, start_s3  # noqa: E402

MIB = 1024 * 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def timed(fn: Callable[[], None], server: Server) -> tuple[float, float]:
    """(wall seconds, moto CPU seconds) of one run."""
    cpu0 = cpu_seconds(server.proc.pid)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    return wall, cpu_seconds(server.proc.pid) - cpu0


def one_round(
    n: int, src: Path, dst: Path, digest: str, tmp: Path, part_mib: int, concurrency: int,
    results: dict[str, dict[str, list[tuple[float, float]]]],
) -> None:  # fmt: skip
    """Every client uploads then downloads the file once, against a fresh moto server of its own round."""
    import boto3
    import obstore
    from boto3.s3.transfer import TransferConfig
    from obstore.store import S3Store

    nbytes = src.stat().st_size
    server = start_s3()
    try:
        os.environ.update(server.env)  # open_store reads the endpoint and keys from the environment
        bucket = server.new_bucket()
        s3 = boto3.client(
            "s3",
            endpoint_url=server.env["AWS_ENDPOINT_URL"],
            aws_access_key_id=server.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=server.env["AWS_SECRET_ACCESS_KEY"],
            region_name=server.env["AWS_REGION"],
        )
        transfer = TransferConfig()  # boto3's defaults: 8 MiB parts, 10 threads
        raw = S3Store(
            bucket,
            config={"endpoint": server.env["AWS_ENDPOINT_URL"], "virtual_hosted_style_request": False},
            client_options={"allow_http": True},
        )
        vol = VolumeData(
            open_store(f"s3://{bucket}/engine"), FileHead(tmp / f"head-{n}.json"),
            part_size=part_mib * MIB, concurrency=concurrency,
        )  # fmt: skip

        def record(phase: str, op: str, fn: Callable[[], None], check: bool = False) -> None:
            wall, moto_cpu = timed(fn, server)
            results.setdefault(phase, {}).setdefault(op, []).append((wall, moto_cpu))
            print(f"  round {n}: {phase} {op} {nbytes / wall / 1e6:.1f} MB/s", file=sys.stderr, flush=True)
            if check:
                assert sha256_file(dst) == digest, f"{phase} {op}: downloaded bytes differ"
                dst.unlink()

        # boto3's transfer manager
        def boto3_upload() -> None:
            s3.upload_file(str(src), bucket, "boto3/src.bin", Config=transfer)

        def boto3_download() -> None:
            s3.download_file(bucket, "boto3/src.bin", str(dst), Config=transfer)

        # cloudmodal's engine: a fresh volume, so no part is in the store already
        def engine_upload() -> None:
            with vol.batch() as b:
                b.put_file(src, "/data/src.bin")

        def engine_download() -> None:
            with dst.open("wb") as f:
                for chunk in vol.read_file("/data/src.bin"):
                    f.write(chunk)

        # obstore alone, on the same endpoint
        def obstore_upload() -> None:
            with src.open("rb") as f:
                obstore.put(raw, "obstore/src.bin", f, chunk_size=8 * MIB, max_concurrency=concurrency)

        def obstore_download() -> None:
            with dst.open("wb") as f:
                for chunk in obstore.get(raw, "obstore/src.bin").stream(min_chunk_size=8 * MIB):
                    f.write(chunk)

        # The clients take turns within a round, so a slow spell of this shared machine hits them alike.
        record("boto3", "upload", boto3_upload)
        record("engine", "upload", engine_upload)
        record("obstore", "upload", obstore_upload)
        record("boto3", "download", boto3_download, check=True)
        record("engine", "download", engine_download, check=True)
        record("obstore", "download", obstore_download, check=True)
        vol.close()
    finally:
        server.stop()


def run(size_mib: int, repeat: int, part_mib: int, concurrency: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="volume-io-"))
    src = tmp / "src.bin"
    with src.open("wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MIB))
    digest = sha256_file(src)
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    try:
        for n in range(repeat):
            one_round(n, src, tmp / "dst.bin", digest, tmp, part_mib, concurrency, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    nbytes = size_mib * MIB
    summary: dict[str, Any] = {
        "size_mib": size_mib, "repeat": repeat, "part_mib": part_mib, "concurrency": concurrency,
        "phases": {},
    }  # fmt: skip
    for phase, ops in results.items():
        summary["phases"][phase] = {}
        for op, runs in ops.items():
            wall = statistics.median(w for w, _ in runs)
            summary["phases"][phase][op] = {
                "median_s": wall,
                "mb_per_s": nbytes / wall / 1e6,
                "moto_cpu_s": statistics.median(c for _, c in runs),
                "runs_s": [w for w, _ in runs],
            }
    return summary


def table(summary: dict[str, Any]) -> str:
    phases = summary["phases"]
    lines = [
        f"## {summary['size_mib']} MiB file, median of {summary['repeat']}; engine parts "
        f"{summary['part_mib']} MiB x {summary['concurrency']} in parallel; S3 = moto_server on 127.0.0.1",
        "",
        "| op | boto3 transfer manager | cloudmodal engine | engine / boto3 | obstore alone | obstore / boto3 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for op in ("upload", "download"):
        b = phases["boto3"][op]["mb_per_s"]
        e = phases["engine"][op]["mb_per_s"]
        o = phases["obstore"][op]["mb_per_s"]
        lines.append(f"| {op} MB/s | {b:.1f} | {e:.1f} | {e / b:.0%} | {o:.1f} | {o / b:.0%} |")
    lines += [
        "",
        "| op | moto CPU s (boto3) | moto CPU s (engine) | moto CPU s (obstore) |",
        "|---|---:|---:|---:|",
    ]
    for op in ("upload", "download"):
        cells = " | ".join(f"{phases[p][op]['moto_cpu_s']:.2f}" for p in ("boto3", "engine", "obstore"))
        lines.append(f"| {op} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="file size in MiB (default 256)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per measurement; the median is shown")
    ap.add_argument("--part-size", type=int, default=16, help="engine part size in MiB (default 16)")
    ap.add_argument("--concurrency", type=int, default=8, help="engine parts in flight (default 8)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    summary = run(args.size, args.repeat, args.part_size, args.concurrency)
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
