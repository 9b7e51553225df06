"""A held lease's release while a renewal is still in flight (the store is a stand-in: the point is the
order of the writes; tests/integration/test_publication_lease.py runs leases against a real S3 server)."""

import threading

from memory3.services.release import lease as lease_module
from memory3.services.release.lease import Publication


class SlowBucket:
    """Puts of a renewal wait for `gate`; everything is recorded."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.gate = threading.Event()
        self.renewing = threading.Event()
        self.puts = 0

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        self.puts += 1
        if self.puts > 1:  # the first is the lease itself; later ones are heartbeats
            self.renewing.set()
            self.gate.wait(10)
        self.objects[key] = data

    def remove_keys(self, keys) -> None:
        for key in keys:
            self.objects.pop(key, None)


def test_a_renewal_that_lands_after_the_release_is_removed_again(monkeypatch):
    """The release waited one renewal interval for the heartbeat thread, then removed the lease; a
    renewal still in flight landed after it, leaving a live lease nobody held for three minutes."""
    monkeypatch.setattr(lease_module, "LEASE_RENEW_S", 0.05)
    bucket = SlowBucket()
    held = Publication(bucket, "r1")
    held._write()
    held._start_beating()
    assert bucket.renewing.wait(5)  # a heartbeat's put is in flight, slower than the release waits
    threading.Timer(0.3, bucket.gate.set).start()
    held.release()
    held._thread.join(5)  # the late heartbeat has landed
    assert bucket.objects == {}  # removed after it, not only before it
