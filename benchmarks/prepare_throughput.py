"""Dataset-conversion throughput: ``prepare_dataset`` against a plain NIfTI-to-.npy loop.

A phantom ACDC tree is generated once into ``--work`` (reused when already there), then
three measurements run in the same process, each writing into a fresh output folder:

1. baseline -- the simplest converter a user would write: for every NIfTI file in the tree
               (``*_4d.nii.gz`` cines, ``*_frameNN.nii.gz`` frames and their ``_gt``
               labels), ``nibabel.load`` -> numpy array in its stored dtype -> one ``.npy``
               file per 2D slice, single process;
2. prepare-1 -- ``prepare_dataset`` with ``workers=1`` (shards + zarr store + index);
3. prepare-N -- ``prepare_dataset`` with ``workers=N`` (default: ``os.cpu_count()``).

Every measurement converts the same files: preparation is asked to put all splits into
the pretraining shards, so it reads every cine as well as every labeled frame. Reported:

* slices/s -- 2D image slices written (a label slice stored with its image is not counted
  again): cine slices x frames plus labeled-frame slices; the same count for every row;
* MB/s -- MB (10**6 bytes) of uncompressed source voxels read, i.e. the sum of the numpy
  ``nbytes`` of every source volume in its stored dtype (gzip decompression included in
  the time, not in the MB);
* the ratio of each to the baseline.

The tree is freshly written (or was read before), so files come from the page cache:
this measures CPU-bound conversion, not disk. Example (CPU, about a minute)::

    python benchmarks/prepare_throughput.py --patients 8 --image-size 128

More patients, more workers, and keep the outputs for inspection::

    python benchmarks/prepare_throughput.py --patients 100 --image-size 256 \
        --workers 16 --work /tmp/medssl-prep --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep.phantom import PhantomConfig, write_acdc_tree

MEASUREMENTS = ("baseline", "prepare-1", "prepare-N")


def make_tree(work: Path, patients: int, image_size: int) -> Path:
    """The phantom tree, written once: patients are written in id order, so the last one's
    cine existing means the tree is complete."""
    root = work / f"phantom_acdc_{image_size}px_{patients}p"
    last = f"patient{patients:03d}"
    if not (root / "training" / last / f"{last}_4d.nii.gz").is_file():
        write_acdc_tree(root, patients, config=PhantomConfig.for_image_size(image_size),
                        progress=True)
    return root


def source_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.nii.gz"))


def baseline_convert(files: list[Path], out: Path) -> tuple[int, int]:
    """nibabel -> numpy -> one .npy per 2D slice. Returns (image slices, source bytes)."""
    slices = nbytes = 0
    for path in files:
        volume = np.asanyarray(nib.load(path).dataobj)  # stored dtype, like medssl reads it
        nbytes += volume.nbytes
        stem = path.name.removesuffix(".nii.gz")
        planes = volume.reshape(*volume.shape[:3], -1)  # cine: (x, y, slice, frame)
        for frame in range(planes.shape[3]):
            for z in range(planes.shape[2]):
                np.save(out / f"{stem}_t{frame:02d}_z{z:03d}.npy", planes[:, :, z, frame])
        if not stem.endswith("_gt"):
            slices += planes.shape[2] * planes.shape[3]
    return slices, nbytes


def prepare_convert(root: Path, out: Path, image_size: int, workers: int) -> int:
    """``prepare_dataset`` over the whole tree. Returns the image slices it wrote."""
    # Imported here, not at the top: spawned worker processes re-import this script, and
    # must not pay for the shard writer's imports (main() imports it once before timing).
    from data_prep.prepare import PrepareConfig, prepare_dataset

    config = PrepareConfig(source=str(root), out=str(out), name="phantom",
                           image_size=image_size,
                           pretrain_splits=["train", "val", "test", "unlabeled"],
                           workers=workers)
    manifest = prepare_dataset(config, progress=False)
    counts = manifest.counts
    return int(counts["pretrain_slices"]) + sum(counts["labeled_slices"].values())


def timed(convert: Callable[[Path], int], work: Path, keep: bool) -> tuple[float, int]:
    """Seconds and slice count of one conversion into a fresh folder under ``work``."""
    out = Path(tempfile.mkdtemp(prefix="out-", dir=work))
    try:
        start = time.perf_counter()
        slices = convert(out)
        return time.perf_counter() - start, slices
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="folder for the tree and the outputs")
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for prepare-N (0: one per CPU core)")
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS),
                        help="run a subset (the baseline always runs: it is the reference)")
    parser.add_argument("--keep", action="store_true", help="keep the converted outputs")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of all measurements; median and range per row")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="medssl-prep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    root = make_tree(work, args.patients, args.image_size)
    files = source_files(root)

    source_bytes = 0

    def baseline(out: Path) -> int:
        nonlocal source_bytes
        slices, source_bytes = baseline_convert(files, out)
        return slices

    runs: dict[str, Callable[[Path], int]] = {"baseline": baseline}
    if {"prepare-1", "prepare-N"} & set(args.only):
        import data_prep.prepare  # noqa: F401  (import time is not conversion time)
    if "prepare-1" in args.only:
        runs["prepare-1"] = lambda out: prepare_convert(root, out, args.image_size, 1)
    if "prepare-N" in args.only:
        label = f"prepare-{args.workers or os.cpu_count()}"  # 0 means one per core
        runs[label] = lambda out: prepare_convert(
            root, out, args.image_size, args.workers)
    # Rounds alternate the measurements, so a slow spell of the machine hits them alike;
    # each row reports the median round and the spread (fastest and slowest round).
    rounds: dict[str, list[tuple[float, int]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, convert in runs.items():
            rounds[name].append(timed(convert, work, args.keep))
    results = {name: (statistics.median(s for s, _ in taken), taken[0][1],
                      min(s for s, _ in taken), max(s for s, _ in taken))
               for name, taken in rounds.items()}
    report(results, source_bytes, args, len(files))


def report(results: dict[str, tuple[float, int, float, float]], source_bytes: int,
           args: argparse.Namespace, n_files: int) -> None:
    base_seconds, base_slices = results["baseline"][:2]
    megabytes = source_bytes / 1e6
    print(f"\nconversion throughput: {args.patients} phantom patients, {n_files} NIfTI files, "
          f"{megabytes:.1f} MB uncompressed source voxels, {base_slices} image slices, "
          f"{args.image_size} px, {os.cpu_count()} CPU cores, median of {args.repeats} "
          "round(s)")
    print(f"{'measurement':<14}{'seconds':>10}{'range':>14}{'slices':>9}{'slices/s':>11}"
          f"{'MB/s':>9}{'ratio':>8}")
    rows = {}
    for name, (seconds, slices, fastest, slowest) in results.items():
        # The ratio compares MB/s: every row reads the same source bytes.
        ratio = base_seconds / seconds
        rows[name] = {"seconds": round(seconds, 3),
                      "seconds_range": [round(fastest, 3), round(slowest, 3)],
                      "slices": slices, "slices_per_s": round(slices / seconds, 1),
                      "mb_per_s": round(megabytes / seconds, 2), "vs_baseline": round(ratio, 3)}
        spread = f"{fastest:.2f}-{slowest:.2f}"
        print(f"{name:<14}{seconds:>10.2f}{spread:>14}{slices:>9}{slices / seconds:>11.1f}"
              f"{megabytes / seconds:>9.2f}{ratio:>8.2f}")
        if slices != base_slices:
            print(f"  note: {name} wrote {slices} slices, the baseline {base_slices}")
    print(json.dumps({"patients": args.patients, "image_size": args.image_size,
                      "files": n_files, "source_mb": round(megabytes, 2),
                      "cpu_count": os.cpu_count(), "workers": args.workers, **rows}))


if __name__ == "__main__":
    main()
