"""XenStoreClient.reconnect (Linux's xs_resume): a second xenstored -- the
store of the host a domain resumed on -- gets every watch again, and the
client's callbacks keep working; the old connection is dropped quietly."""

import threading
import time

from xenbed.drivers.xen.store import XenStoreClient

from .test_blkback_support import InProcessXenstored


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_reconnect_to_another_store_re_registers_watches(tmp_path):
    host_a = InProcessXenstored(str(tmp_path / "a.sock"))
    host_b = InProcessXenstored(str(tmp_path / "b.sock"))
    client = XenStoreClient(host_a.path)
    seen, lock = [], threading.Lock()

    def fired(path, token):
        with lock:
            seen.append((path, token))

    client.watch("/local/domain/5/device", "dev", fired)
    assert wait_until(lambda: ("/local/domain/5/device", "dev") in seen)  # fires once at registration
    client.write("/local/domain/5/device/on-a", "1")
    client.reconnect(host_b.path)
    assert not client.closed.is_set()  # the old connection went away on purpose
    assert client.try_read("/local/domain/5/device/on-a") is None  # this is host b's store
    with lock:
        seen.clear()
    writer = XenStoreClient(host_b.path)
    writer.write("/local/domain/5/device/vbd", "x")
    assert wait_until(lambda: ("/local/domain/5/device/vbd", "dev") in seen)  # the watch lives on b
    writer.close()
    client.close()
    host_a.close()
    host_b.close()


def test_reconnect_after_the_old_store_closed_the_connection(tmp_path):
    """The host a domain left drops its store connections; the client is
    closed then, and reconnect() opens it again with its watch thread."""
    host_a = InProcessXenstored(str(tmp_path / "a.sock"))
    host_b = InProcessXenstored(str(tmp_path / "b.sock"))
    client = XenStoreClient(host_a.path)
    seen = []
    client.watch("/w", "t", lambda path, token: seen.append(path))
    host_a.close()  # closes every client connection
    assert wait_until(client.closed.is_set)
    time.sleep(0.1)  # the watch thread saw the end
    assert client.reconnect(host_b.path) == []
    assert not client.closed.is_set()
    seen.clear()
    client.write("/w/x", "1")
    assert wait_until(lambda: "/w/x" in seen)
    client.close()
    host_b.close()
