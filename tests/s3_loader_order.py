"""A torchrun worker for tests/test_s3_pretrain.py: the batches this rank's loader
delivers for each dataset location given, as image digests, written to OUT/rankN.json."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from cluster.distributed import init_distributed, shutdown
from pretrain.batching import plan_batches
from pretrain.data import pretrain_epoch_samples
from pretrain.epoch_loader import open_epoch
from tests.conftest import small_pretrain_config


def main(out: str, *locations: str) -> None:
    dist = init_distributed(prefer_cuda=False)
    delivered: dict[str, list[list[str]]] = {}
    for location in locations:
        config = small_pretrain_config(location, out)
        config.data.workers, config.data.epoch_samples = 2, 0
        plan = plan_batches(config, dist.world_size,
                            pretrain_epoch_samples(location, 0, False))
        reading = open_epoch(config, plan, dist, epoch=1, first=0, saved=[])
        delivered[location] = [
            [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in batch]
            for batch in reading.batches]  # type: ignore[union-attr]
    Path(out, f"rank{dist.rank}.json").write_text(json.dumps(delivered))
    shutdown(dist)


if __name__ == "__main__":
    main(*sys.argv[1:])
