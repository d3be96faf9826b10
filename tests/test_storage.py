"""cluster.storage against a real S3 server (moto's, on loopback) and local paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.storage import StorageError, is_url, join, local_path, name_of, parent_of
from cluster.storage.objects import (
    delete,
    download,
    exists,
    list_files,
    read_bytes,
    read_range,
    write_bytes,
    write_text,
)
from cluster.storage.retry import is_transient
from tests.s3_support import FaultProxy, FaultSchedule, S3Server, environment

FAST_RETRIES = {"MEDSSL_STORAGE_ATTEMPTS": "4", "MEDSSL_STORAGE_TIMEOUT": "1",
                "MEDSSL_STORAGE_BACKOFF": "0.01"}


def test_urls_and_paths() -> None:
    assert is_url("s3://b/k") and not is_url("/x/y") and not is_url("file:///x/y")
    assert local_path("file:///x/y") == Path("/x/y")
    assert join("s3://b/p/", "runs", "a.txt") == "s3://b/p/runs/a.txt"
    assert join("file:///x", "y") == "/x/y"
    assert parent_of("s3://b/p/q") == "s3://b/p" and name_of("s3://b/p/q/") == "q"
    with pytest.raises(ValueError, match="unsupported URL scheme 'gs'"):
        is_url("gs://b/k")


@pytest.mark.parametrize("where", ["local", "file", "s3"])
def test_same_calls_for_every_place(where: str, s3: S3Server, tmp_path: Path) -> None:
    root = {"local": str(tmp_path), "file": f"file://{tmp_path}", "s3": s3.new_bucket()}[where]
    data = bytes(range(256)) * 40
    write_bytes(join(root, "dir", "blob.bin"), data)
    write_text(join(root, "dir", "sub", "note.txt"), "hello")
    assert read_bytes(join(root, "dir", "blob.bin")) == data
    assert read_range(join(root, "dir", "blob.bin"), 1000, 1100) == data[1000:1100]
    assert exists(join(root, "dir", "sub", "note.txt"))
    assert not exists(join(root, "dir", "missing.txt"))
    assert list_files(join(root, "dir")) == {"blob.bin": len(data), "sub/note.txt": 5}
    assert list_files(join(root, "nothing-here")) == {}
    with pytest.raises(ValueError, match="fewer bytes than asked"):
        read_range(join(root, "dir", "blob.bin"), len(data) - 10, len(data) + 10)
    delete(join(root, "dir", "sub", "note.txt"))
    delete(join(root, "dir", "sub", "note.txt"))  # missing: no error
    assert list(list_files(join(root, "dir"))) == ["blob.bin"]
    copy = download(join(root, "dir", "blob.bin"), tmp_path / "copy" / "blob.bin") \
        if where == "s3" else None
    assert copy is None or copy.read_bytes() == data


def test_missing_object_names_the_url(s3: S3Server) -> None:
    url = join(s3.new_bucket(), "no", "such.bin")
    with pytest.raises(FileNotFoundError, match=f"{url} does not exist"):
        read_bytes(url)


def test_transient_faults_are_retried_and_data_is_whole(s3: S3Server) -> None:
    bucket = s3.new_bucket()
    data = bytes(range(256)) * 4096  # 1 MiB: the reset lands mid-body
    write_bytes(join(bucket, "big.bin"), data)
    schedule = FaultSchedule(reset_after_bytes={1: 300_000, 3: 5_000},
                             stall_seconds={2: 3.0})
    proxy = FaultProxy(s3.port, schedule)
    try:
        with environment({"AWS_ENDPOINT_URL": proxy.endpoint, **FAST_RETRIES}):
            assert read_bytes(join(bucket, "big.bin")) == data
            assert read_range(join(bucket, "big.bin"), 12345, 600_000) == data[12345:600_000]
        assert proxy.resets >= 1 and proxy.stalls == 1
    finally:
        proxy.close()


def test_server_gone_for_good_is_one_storage_error(s3: S3Server) -> None:
    bucket = s3.new_bucket()
    write_bytes(join(bucket, "x.bin"), b"x" * 10)
    proxy = FaultProxy(s3.port)
    proxy.close()
    with environment({"AWS_ENDPOINT_URL": proxy.endpoint, **FAST_RETRIES}), \
            pytest.raises(StorageError, match=rf"{bucket}/x.bin: read failed 4 times"):
        read_bytes(join(bucket, "x.bin"))


def test_classification() -> None:
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError()) and not is_transient(PermissionError())
    assert not is_transient(ValueError())
