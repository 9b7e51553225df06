"""The object store's bulk removal on a real S3 server (rclone serve s3)."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest

from memory3.services.storage.object_store import ObjectStore, StoreUnavailable

pytestmark = pytest.mark.integration


def test_a_prefix_of_more_than_one_listed_page_is_removed_whole_as_it_is_listed_and_nothing_beside_it(bucket):
    store = bucket
    keys = [f"memories/bank/{i % 7:02d}/{i:05d}" for i in range(1234)]  # S3 lists 1000 keys a page
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: store.put_bytes(key, b"x"), keys))
    store.put_bytes("memories/bank-2/00/kept", b"y")
    seen = []
    assert store.remove_keys(store.iter_keys("memories/bank/"), progress=seen.append) == len(keys)
    assert seen == [1000, len(keys)]
    assert store.list_keys("memories/bank/") == []
    assert store.list_keys("memories/") == ["memories/bank-2/00/kept"]
    assert store.remove_keys(["memories/bank-2/00/kept", "memories/never-there"]) == 2  # a missing key is no error
    assert store.list_keys("memories/") == []


def test_bulk_removal_from_an_unreachable_store_says_so(local_s3):
    dead = ObjectStore(dataclasses.replace(local_s3.config, endpoint="127.0.0.1:9", timeout_s=1.0))
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        dead.remove_keys(dead.iter_keys("memories/"))
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        dead.remove_keys(["a"])


def test_an_https_store_signed_by_a_private_ca_is_trusted_with_its_bundle(tmp_path, pki):
    """An on-premises store behind an internal CA could not be used: only the system's CAs were trusted."""
    from memory3.services.storage.local_s3 import start_local_s3

    server = start_local_s3(tmp_path / "s3", tls=(pki["server"], pki["server_key"]))
    try:
        trusted = ObjectStore(dataclasses.replace(server.config, ca_bundle=pki["ca"]))
        trusted.ensure_bucket()
        trusted.put_bytes("probe", b"over https")
        assert trusted.get_bytes("probe") == b"over https"
        with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            ObjectStore(server.config, read_retries=0).get_bytes("probe")
    finally:
        server.stop()
