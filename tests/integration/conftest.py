import dataclasses
import datetime
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from release_fixtures import RandomRelease, build_random_release

from memory3.services.storage.local_redis import LocalRedis, start_local_redis
from memory3.services.storage.local_s3 import start_local_s3
from memory3.services.storage.object_store import ObjectStore


@pytest.fixture(scope="session")
def local_s3(tmp_path_factory):
    """A real S3 server (rclone serve s3) on 127.0.0.1, stopped by PID at the end."""
    root = tmp_path_factory.mktemp("s3")
    server = start_local_s3(root / "data", log_file=root / "rclone.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def store(local_s3) -> ObjectStore:
    s = ObjectStore(local_s3.config)
    s.ensure_bucket()
    return s


@pytest.fixture
def bucket(local_s3) -> ObjectStore:
    """A fresh bucket of the test's own on the session's S3 server: what other tests published or
    left behind must not change the outcome of a test that lists or deletes releases."""
    store = ObjectStore(dataclasses.replace(local_s3.config, bucket=f"test-{uuid.uuid4().hex[:12]}"))
    store.ensure_bucket()
    return store


@pytest.fixture
def local_redis(tmp_path_factory) -> LocalRedis:
    """A real redis-server (Debian package) on 127.0.0.1, fresh per test, stopped by PID.

    Fault tests may `kill()` it and `start()` it again on the same port.
    """
    server = start_local_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embedder():
    """The real query and reference embedder (all-MiniLM-L6-v2), loaded once for the session."""
    from memory3.services.retrieval.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def random_release(store) -> RandomRelease:
    """A tiny published release (random weights, a dozen references): see release_fixtures.py."""
    return build_random_release(store)


@pytest.fixture(scope="session")
def reliability_stack(tmp_path_factory):
    """The fault-injection stack of bench/reliability.py: S3 behind a delay proxy, a password-protected
    Redis, and a "continue"-policy decoder beside the "fail" one. Tests restore what they break."""
    from memory3.bench.reliability import ReliabilityStack

    with ReliabilityStack(tmp_path_factory.mktemp("reliability"), log=lambda _msg: None) as stack:
        yield stack


@pytest.fixture
def base(bucket, embedder):
    """A random-weights release named "base" in the test's own bucket; the bucket."""
    build_random_release(bucket, "base", embedder=embedder)
    return bucket


@pytest.fixture
def document(tmp_path):
    """A one-fact document to add to a release."""
    path = tmp_path / "added.txt"
    path.write_text("Orla Venn tunes bells in the tower of Carrow Ness every spring.\n")
    return path


def _cert(name: str, issuer_key, issuer_name, key, *, ca: bool, san: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for localhost, a client certificate; all PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "memory3 test CA")])
    ca = _cert("memory3 test CA", ca_key, ca_name, ca_key, ca=True)
    files = {"ca": ca}
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[who] = _cert(who, ca_key, ca_name, key, ca=False, san="localhost" if who == "server" else None)
        (root / f"{who}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    paths = {}
    for who, cert in files.items():
        (root / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[who] = root / f"{who}.pem"
    paths["server_key"], paths["client_key"] = root / "server.key", root / "client.key"
    return paths
