"""Re-read a prepared dataset (a folder or an ``s3://`` URL) and check it against its
manifest."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cluster.storage import is_url, join
from cluster.storage.objects import download, exists
from data_prep.checksums import sha256_file
from data_prep.manifest import Manifest
from data_prep.shard_reader import index_location, iterate_shards
from data_prep.zarr_store import LabeledSlices


def verify_dataset(folder: str | Path, source: str | Path | None = None) -> list[str]:
    """Return a list of problems (empty when every shard and array matches the manifest).

    With ``source`` (the raw dataset root), also check that every source file the
    dataset was made from is still there with the same sha256.
    """
    manifest = Manifest.read(folder)
    problems: list[str] = []
    if source is not None:
        problems += _check_sources(Path(source), manifest.source_files)
    for expected in manifest.shards:
        path = join(folder, "shards", expected["name"])
        if not exists(path):
            problems.append(f"{path}: missing")
            continue
        if not exists(index_location(path)):
            problems.append(f"{index_location(path)}: DALI index missing")
        with _local_copy(path) as local:
            problems += _check_shard(path, local, expected)
    store_path = join(folder, manifest.labeled_store["path"])
    for split, count in manifest.labeled_store["slices"].items():
        try:
            store = LabeledSlices(store_path, split)
        except (FileNotFoundError, KeyError) as exc:
            problems.append(str(exc))
            continue
        if len(store) != count:
            problems.append(f"{store_path}/{split}: {len(store)} slices, manifest says {count}")
            continue
        for index in range(len(store)):
            image, mask = store.raw(index)
            if image.shape != (manifest.image_size,) * 2 or mask.shape != image.shape:
                problems.append(f"{store_path}/{split}[{index}]: shape {image.shape}")
                break
    return problems


@contextlib.contextmanager
def _local_copy(location: str) -> Iterator[Path]:
    """The shard as a local file: itself, or a temporary download from a store."""
    if not is_url(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="medssl-verify-") as tmp:
        yield download(location, Path(tmp) / "shard.tar")


def _check_shard(name: str, path: Path, expected: dict) -> list[str]:
    """Checksum and sample count of one shard (``name``: where it lives, for messages)."""
    problems = []
    digest = sha256_file(path)
    if digest != expected["sha256"]:
        problems.append(f"{name}: checksum {digest[:12]} != manifest "
                        f"{expected['sha256'][:12]}")
    try:
        samples = sum(1 for _ in iterate_shards([str(path)]))
    except Exception as exc:
        return [*problems, f"{name}: cannot decode every sample ({exc})"]
    if samples != expected["samples"]:
        problems.append(f"{name}: {samples} samples, manifest says {expected['samples']}")
    return problems


def _check_sources(root: Path, expected: dict[str, str]) -> list[str]:
    problems = []
    for name, digest in expected.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{path}: source file missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: source file changed since the dataset was prepared")
    return problems
