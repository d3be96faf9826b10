"""The DALI loader on an ``s3://`` dataset: DALI opens the shard and index URLs itself.

The store is moto's server in this very process (the ``s3`` fixture), which answers only
while DALI does not hold the GIL. DALI holds it in ``Pipeline.build`` (hence the reader's
``lazy_init``, see :func:`pretrain.dali_pipeline.read_samples`) and while shutting a
pipeline down: a read-ahead request still in flight then waits for the server until curl
gives up (3 s per attempt, three attempts). So each loader here is dropped only once its
read-ahead is done (:func:`settle`). DALI also reads the endpoint once per process, at
its first ``s3://`` read: the fixture's, which holds for the whole session.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.storage import is_url, join
from cluster.storage.objects import delete, upload
from data_prep.manifest import Manifest
from data_prep.shard_reader import index_location, shard_paths
from pretrain.dali_loader import (
    build_dali_loader,
    check_s3_endpoint,
    index_paths,
)
from tests.s3_support import S3Server, upload_tree

BATCH = 16


def publish(prepared: Path, s3: S3Server) -> str:
    """The pretraining part of ``prepared`` (manifest, shards, index files) in a new bucket."""
    data = s3.new_bucket() + "/ds"
    upload_tree(prepared / "shards", join(data, "shards"))
    upload(prepared / "manifest.json", join(data, "manifest.json"))
    return data


@pytest.fixture(scope="module")
def published(prepared: Path, s3: S3Server) -> str:
    return publish(prepared, s3)


def settle(limit: float = 10.0) -> None:
    """Wait until this process has been idle for 0.1 s (DALI's read-ahead, served by the
    in-process store, keeps a core busy until it is done), or ``limit`` seconds."""
    deadline = time.monotonic() + limit
    before = time.process_time()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = time.process_time()
        if now - before < 0.005:
            return
        before = now


def first_batch(data: str, *, rank: int, world_size: int) -> np.ndarray:
    """The first batch of ``rank``'s part, decoded and normalised (no augmentation)."""
    batches = build_dali_loader(data, per_rank_batch=BATCH, rank=rank, world_size=world_size,
                                seed=0, device="cpu", shuffle_buffer=0, threads=1)
    batch = next(batches)
    assert isinstance(batch, torch.Tensor)  # no views: one tensor
    if is_url(data):
        settle()
    del batches  # the pipeline shuts down here, with no read in flight
    return batch.numpy()


def test_s3_shards_decode_exactly_like_local_shards(prepared: Path, published: str) -> None:
    for rank, world_size in ((0, 1), (1, 2)):  # the first shard, and one further on
        local = first_batch(str(prepared), rank=rank, world_size=world_size)
        remote = first_batch(published, rank=rank, world_size=world_size)
        assert remote.shape == (BATCH, 1, 64, 64)
        assert np.array_equal(remote, local)  # bit-exact, the same samples in the same order


def test_dali_itself_opens_the_urls(published: str) -> None:
    from nvidia.dali import Pipeline

    from pretrain.dali_pipeline import read_samples

    shards = shard_paths(published)
    pipe = Pipeline(batch_size=4, num_threads=1, device_id=None, seed=0)
    with pipe:
        pipe.set_outputs(*read_samples(shards, index_paths(shards), shard_id=0, num_shards=1,
                                       shuffle_buffer=0))
    pipe.build()
    images, _ = pipe.run()
    settle()
    del pipe
    # DALI's own "<tar>:<offset>:<member>" for each sample: the object it read
    assert re.fullmatch(re.escape(shards[0]) + r":\d+:\S+\.image\.npy", images[0].source_info())


def test_a_missing_index_object_is_named(prepared: Path, s3: S3Server) -> None:
    data = publish(prepared, s3)
    missing = index_location(join(data, "shards", Manifest.read(prepared).shards[-1]["name"]))
    delete(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        build_dali_loader(data, per_rank_batch=BATCH, rank=0, world_size=1, seed=0,
                          device="cpu", shuffle_buffer=0, threads=1)


def test_endpoints_that_disagree_are_refused() -> None:
    check_s3_endpoint({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1"})  # DALI's SDK reads it
    check_s3_endpoint({"AWS_ENDPOINT_URL": "http://127.0.0.1:1/",
                       "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1"})
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_S3 differ"):
        check_s3_endpoint({"AWS_ENDPOINT_URL": "http://127.0.0.1:1",
                           "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:2"})
