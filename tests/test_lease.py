"""The lease that keeps one driver per sweep, on a file system and on an S3 server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cluster.storage import join
from cluster.storage.lease import Lease, LeaseHeld
from tests.s3_support import S3Server


@pytest.fixture(params=["file", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return str(tmp_path / "sweep" / "driver.lease")
    s3: S3Server = request.getfixturevalue("s3")
    return join(s3.new_bucket(), "sweep", "driver.lease")


def test_one_holder_at_a_time_and_a_dead_one_lapses(location: str) -> None:
    first = Lease(location, ttl=1.0, holder="driver A")
    first.acquire(wait=0)
    first.renew()
    second = Lease(location, ttl=1.0, holder="driver B")
    seen = []
    with pytest.raises(LeaseHeld, match="held by driver A"):
        second.acquire(wait=0.3, on_wait=seen.append)
    assert [record.holder for record in seen] == ["driver A"]
    # A renews while alive: B, waiting less than two lifetimes, never gets it
    first.keep(on_lost=lambda why: None)
    with pytest.raises(LeaseHeld, match="driver A"):
        second.acquire(wait=1.8)
    first.release()  # a clean end: the lease is free at once
    started = time.monotonic()
    second.acquire(wait=0)
    assert time.monotonic() - started < 0.5
    # B dies without releasing: C takes over once B's lease sat unchanged for its ttl
    third = Lease(location, ttl=1.0, holder="driver C")
    started = time.monotonic()
    third.acquire(wait=5)
    assert 1.0 <= time.monotonic() - started < 4
    with pytest.raises(LeaseHeld, match="lost to driver C"):
        second.renew()
    third.release()


def test_a_renewal_thread_reports_a_lost_lease(location: str) -> None:
    lease = Lease(location, ttl=0.4, holder="driver A")
    lease.acquire(wait=0)
    lost: list[str] = []
    lease.keep(on_lost=lost.append)
    time.sleep(0.3)
    thief = Lease(location, ttl=0.4, holder="driver B")
    thief._store.replace(thief.mine, lease._version)  # taken over under A's feet
    deadline = time.monotonic() + 3
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and "lost to driver B" in lost[0]
