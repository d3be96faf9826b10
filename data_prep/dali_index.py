"""DALI index files for the pretraining shards.

``nvidia.dali.fn.readers.webdataset`` reads a tar by random access through an index file
per shard; without one it scans every tar at start-up. DALI ships a ``wds2idx`` tool for
this, but it shells out to GNU tar and skips the checks we want, so the index is written
here, with :mod:`tarfile`, right after the shards are.

The format (DALI "v1.2") is a header line ``v1.2 <num_samples>`` and then one line per
sample listing, for each of its files in tar order, ``<ext> <data_offset> <size> <name>``
separated by single spaces, e.g.::

    image.npy 1536 8320 k0.image.npy meta.json 11776 249 k0.meta.json

Files are grouped into samples the way WebDataset and DALI do: consecutive regular files
with the same key, the key being the name up to the first dot of its last path component
and the extension the rest.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from cluster.atomic import atomic_write_text

INDEX_VERSION = "v1.2"
INDEX_SUFFIX = ".idx"
SHARD_GLOB = "pretrain-*.tar"
_BLOCK = tarfile.BLOCKSIZE

Component = tuple[str, int, int, str]  # extension, data offset, size, member name


def default_index_path(tar_path: Path) -> Path:
    """``pretrain-NNNNNN.tar`` -> ``pretrain-NNNNNN.idx``: the name DALI's tool picks too."""
    return Path(tar_path).with_suffix(INDEX_SUFFIX)


def split_member_name(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) at the first dot of its last component."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        raise ValueError(f"member {name!r} has no extension (no dot in its name)")
    return name[:dot], name[dot + 1 :]


def read_samples(tar_path: Path) -> list[list[Component]]:
    """The components of every sample of one shard, in tar order.

    :mod:`tarfile` stops quietly at a truncated or damaged header, so the archive must
    also end with an end-of-archive (all-zero) block where the last member ends;
    otherwise the index would silently describe only part of the shard.
    """
    tar_path = Path(tar_path)
    samples: list[list[Component]] = []
    last_key: str | None = None
    try:
        with tarfile.open(tar_path, mode="r:") as archive:
            for member in archive:
                if not member.isreg():
                    continue  # directories, links: DALI and WebDataset ignore them too
                name = member.name
                if any(c.isspace() for c in name):
                    raise ValueError(f"member {name!r} contains whitespace, which the "
                                     "space-separated index format cannot hold")
                key, ext = split_member_name(name)
                if not key or key.endswith("/"):
                    continue  # hidden file (name starts with a dot): DALI skips these
                component = (ext, member.offset_data, member.size, name)
                if key == last_key:
                    if any(c[0] == ext for c in samples[-1]):
                        raise ValueError(f"sample {key!r} has {ext!r} twice")
                    samples[-1].append(component)
                else:
                    samples.append([component])
                    last_key = key
            end = archive.offset  # where the next header (the end marker) must start
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"{tar_path}: not a readable tar archive ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{tar_path}: {exc}") from None
    with open(tar_path, "rb") as f:
        f.seek(end)
        marker = f.read(_BLOCK)
    if len(marker) < _BLOCK or marker.count(0) != _BLOCK:
        raise ValueError(f"{tar_path}: truncated or corrupt tar archive (no end-of-archive "
                         f"block at byte {end} after {len(samples)} samples)")
    if not samples:
        raise ValueError(f"{tar_path}: tar archive holds no samples")
    return samples


def format_index(samples: list[list[Component]]) -> str:
    """Render samples as DALI's v1.2 index text (newline-terminated, as wds2idx writes)."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{ext} {offset} {size} {name}"
                              for ext, offset, size, name in sample))
    return "\n".join(lines) + "\n"


def write_dali_index(tar_path: Path, index_path: Path | None = None) -> Path:
    """Write the DALI index of one shard (atomically) and return its path.

    Raises ``ValueError`` naming the tar when it is truncated, corrupt, empty, or holds a
    member whose name has no extension.
    """
    tar_path = Path(tar_path)
    index_path = default_index_path(tar_path) if index_path is None else Path(index_path)
    atomic_write_text(index_path, format_index(read_samples(tar_path)))
    return index_path


def write_dali_indices(shard_dir: Path) -> list[Path]:
    """Index every ``pretrain-*.tar`` in ``shard_dir``; returns the index paths, sorted."""
    return [write_dali_index(tar) for tar in sorted(Path(shard_dir).glob(SHARD_GLOB))]
