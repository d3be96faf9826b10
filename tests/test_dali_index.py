"""DALI index files: same bytes as DALI's own tool, and DALI's reader reads our shards right."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

# DALI is a test dependency (`make test` installs the dali extra): imported plainly, not
# skipped, so a missing install fails loudly instead of passing silently.
import wds2idx  # DALI's reference index tool, shipped with it
from nvidia.dali import fn, pipeline_def

from data_prep.dali_index import default_index_path, write_dali_index, write_dali_indices
from data_prep.shard_reader import DecodedSlice, iterate_shards, shard_paths

BATCH = 16  # does not divide the shard sizes, so the padded last batch is exercised


@pytest.fixture(scope="module")
def shard_copies(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The prepared shards, copied (in manifest order) so index files stay out of ``prepared``."""
    folder = tmp_path_factory.mktemp("dali") / "shards"
    folder.mkdir()
    return [Path(shutil.copy2(p, folder)) for p in shard_paths(prepared)]


@pytest.fixture(scope="module")
def indexed(shard_copies: list[Path]) -> list[Path]:
    indices = write_dali_indices(shard_copies[0].parent)
    assert indices == sorted(default_index_path(t) for t in shard_copies)
    return [default_index_path(t) for t in shard_copies]


@pytest.fixture(scope="module")
def reference(prepared: Path) -> dict[str, DecodedSlice]:
    """Every sample as our WebDataset reader decodes it, by key, in stream order."""
    return {s.key: s for s in iterate_shards(shard_paths(prepared))}


def key_of(source_info: str) -> str:
    """DALI's source info is ``<tar>:<offset>:<member name>``; the key is the name's stem."""
    return source_info.rsplit(":", 1)[1].split(".", 1)[0]


def test_index_matches_dali_tool(shard_copies: list[Path], indexed: list[Path],
                                 tmp_path: Path) -> None:
    assert [p.name for p in indexed] == [t.with_suffix(".idx").name for t in shard_copies]
    for tar, ours in zip(shard_copies, indexed):
        theirs = tmp_path / f"{tar.stem}.ref.idx"
        with wds2idx.IndexCreator(str(tar), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert ours.read_text() == theirs.read_text(), tar.name  # byte-identical
        header, *lines = ours.read_text().splitlines()
        assert header.startswith("v1.2 ") and int(header.split()[1]) == len(lines) > 0


def read_pipeline(tars: list[Path], indices: list[Path], *, shard_id: int = 0,
                  num_shards: int = 1):
    @pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        image, meta, mask = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(i) for i in indices],
            ext=["image.npy", "meta.json", "mask.npy"],
            # image and meta are in every sample; mask only in labeled ones -> empty bytes.
            missing_component_behavior="empty", random_shuffle=False, name="reader",
            shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, stick_to_shard=True)
        return image, meta, mask, fn.decoders.numpy(image)

    pipeline = pipe()
    pipeline.build()
    return pipeline


def shard_size(total: int, shard_id: int, num_shards: int) -> int:
    """DALI's split of ``total`` samples: shard i holds [i*N//S, (i+1)*N//S)."""
    return (shard_id + 1) * total // num_shards - shard_id * total // num_shards


def read_epoch(pipeline, shard_id: int = 0, num_shards: int = 1) -> list[dict]:
    """Exactly one epoch of one reader shard: its batches, the last one's padding dropped."""
    meta = pipeline.reader_meta("reader")
    assert (meta["shard_id"], meta["number_of_shards"]) == (shard_id, num_shards)
    size = shard_size(meta["epoch_size"], shard_id, num_shards)
    samples: list[dict] = []
    for _ in range(math.ceil(size / BATCH)):
        image, meta_json, mask, decoded = pipeline.run()
        for i in range(len(image)):
            samples.append({
                "key": key_of(image[i].source_info()),
                "image": image.at(i).tobytes(),
                "meta": json.loads(meta_json.at(i).tobytes()),
                "mask": mask.at(i).tobytes(),
                "decoded": np.array(decoded.at(i)),
            })
    padding = samples[size:]
    # pad_last_batch repeats the shard's last sample to fill the last batch.
    assert all(p["key"] == samples[size - 1]["key"] for p in padding)
    return samples[:size]


def test_dali_reads_every_sample_like_webdataset(
    shard_copies: list[Path], indexed: list[Path], reference: dict[str, DecodedSlice]
) -> None:
    samples = read_epoch(read_pipeline(shard_copies, indexed))
    assert [s["key"] for s in samples] == list(reference)  # same samples, same order
    for sample in samples:
        expected = reference[sample["key"]]
        assert sample["meta"] == expected.meta
        raw = np.load(io.BytesIO(sample["image"]), allow_pickle=False)
        assert raw.dtype == expected.raw.dtype and np.array_equal(raw, expected.raw)
        # DALI's own .npy decoder, fed the reader's bytes, gives the same array.
        assert sample["decoded"].dtype == expected.raw.dtype
        assert np.array_equal(sample["decoded"], expected.raw)
        if expected.mask is None:
            assert sample["mask"] == b""
        else:
            mask = np.load(io.BytesIO(sample["mask"]), allow_pickle=False)
            assert mask.dtype == expected.mask.dtype and np.array_equal(mask, expected.mask)
    assert any(s["mask"] for s in samples) and any(not s["mask"] for s in samples)


def test_two_dali_shards_see_every_sample_once(
    shard_copies: list[Path], indexed: list[Path], reference: dict[str, DecodedSlice]
) -> None:
    seen = [
        [s["key"] for s in read_epoch(read_pipeline(shard_copies, indexed, shard_id=shard_id,
                                                    num_shards=2), shard_id, 2)]
        for shard_id in (0, 1)
    ]
    assert all(seen) and not set(seen[0]) & set(seen[1])
    assert seen[0] + seen[1] == list(reference)  # disjoint, contiguous, complete


def _cut(source: Path, dest: Path, length: int) -> Path:
    dest.write_bytes(source.read_bytes()[:length])
    return dest


def test_truncated_or_corrupt_tar_is_rejected(shard_copies: list[Path], tmp_path: Path) -> None:
    source = shard_copies[0]
    with tarfile.open(source) as archive:
        members = [m for m in archive if m.isreg()]
        end = archive.offset
    second, last = members[1], members[-1]
    cuts = {
        "in-first-header": 100,
        "in-data": second.offset_data + second.size // 2,
        "at-member-boundary": second.offset,  # looks like a clean end to tarfile
        "in-last-data": last.offset_data + last.size - 1,
        "no-end-marker": end,
    }
    for label, length in cuts.items():
        broken = _cut(source, tmp_path / f"{label}.tar", length)
        with pytest.raises(ValueError, match=re.escape(str(broken))):
            write_dali_index(broken)
        assert not default_index_path(broken).exists()
    corrupt = bytearray(source.read_bytes())
    corrupt[second.offset:second.offset + 8] = b"garbage!"  # breaks the header checksum
    bad = tmp_path / "corrupt-header.tar"
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=re.escape(f"{bad}: truncated or corrupt")):
        write_dali_index(bad)
    empty = _cut(source, tmp_path / "zero-bytes.tar", 0)
    with pytest.raises(ValueError, match=re.escape(f"{empty}: not a readable tar archive")):
        write_dali_index(empty)


def test_member_without_extension_is_rejected(tmp_path: Path) -> None:
    tar = tmp_path / "pretrain-000000.tar"
    with tarfile.open(tar, "w") as archive:
        for name in ("k0.meta.json", "README"):
            info = tarfile.TarInfo(name)
            info.size = 2
            archive.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ValueError, match=r"pretrain-000000\.tar.*'README'"):
        write_dali_index(tar)
    assert not default_index_path(tar).exists()


def test_grouping_and_custom_index_path(tmp_path: Path) -> None:
    tar = tmp_path / "pretrain-000007.tar"
    folder = tarfile.TarInfo("d")
    folder.type = tarfile.DIRTYPE
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as archive:
        archive.addfile(folder)  # not a regular file: skipped
        for name, data in (("a.image.npy", b"xy"), ("a.meta.json", b"{}"), (".hidden.txt", b"-"),
                           ("d/b.x.y", b"123")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    index = write_dali_index(tar, tmp_path / "custom" / "my.idx")
    assert index == tmp_path / "custom" / "my.idx"
    # USTAR: one 512-byte header before each file's data, data padded to 512 bytes.
    assert index.read_text() == (
        "v1.2 2\n"
        "image.npy 1024 2 a.image.npy meta.json 2048 2 a.meta.json\n"
        "x.y 4096 3 d/b.x.y\n"
    )
    assert not default_index_path(tar).exists()
    reference = tmp_path / "reference.idx"
    with wds2idx.IndexCreator(str(tar), str(reference), verbose=False) as creator:
        creator.create_index()
    assert reference.read_text() == index.read_text()
