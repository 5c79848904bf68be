"""The "block" hotplug step: what Xen's /etc/xen/scripts/block does, in dom0.

    python3 -m xenbed.drivers.blk.hotplug add    /local/domain/0/backend/vbd/1/51712
    python3 -m xenbed.drivers.blk.hotplug remove /local/domain/0/backend/vbd/1/51712
    python3 -m xenbed.drivers.blk.hotplug change /local/domain/0/backend/vbd/1/5632

add
    reads `params` (the target: an image file, or a block device) and `mode`
    ("r" or "w"; "w!" forces sharing a writable file) from the backend dir;
    a file is attached to a loop device (read-only for "r"), a block device
    is used as it is; then writes, in one transaction,

        physical-device       "%x:%x" major:minor, as Linux writes it ("7:a" = loop10)
        physical-device-path  /dev/loopN
        hotplug-status        connected

    blkback watches `physical-device` and connects once it is there.  On any
    failure: `hotplug-error` (the reason) and `hotplug-status` = error, and
    the CLI exits 1.  The loop is attached WITHOUT autoclear: blkback opens
    it and turns autoclear on, so the last close (blkback's, even a killed
    one) frees it.
change
    a media change on a removable (cdrom) backend, whose `params` the
    toolstack has just rewritten (`xl cd-insert` / `xl cd-eject`): attach
    the new target (none when `params` is empty: an ejected drive), then in
    one transaction write the new `physical-device` / `physical-device-path`
    (or remove both: no medium) with `hotplug-status` connected -- blkback
    watches `physical-device` and swaps its open disk while Connected -- and
    finally release the old loop device (LOOP_CLR_FD only if it still backs
    the file it backed before the change; with blkback still holding it the
    kernel detaches it at blkback's close).  A failed attach leaves the old
    medium in place, writes `hotplug-error` and exits 1 (`hotplug-status`
    stays connected: the drive itself is fine).
remove
    detaches the loop device named by `physical-device` if it is still
    attached to our target (with blkback still holding it open the kernel
    detaches it at blkback's close), and removes the keys add wrote.  A
    backend dir already gone (the toolstack removed it) is fine.

`store` is any object with XenStoreClient's read/try_read/write/rm/
run_transaction methods (tests pass an in-memory one).
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import time

from xenbed.drivers.xenbus.hotplug_status import (
    HotplugError, clear_keys, is_missing, rm_if_present, run_as_command, write_connected, write_error,
)

from . import loop

log = logging.getLogger("xenbed.blk.hotplug")

# Written in a backend dir by `xl migrate`'s receiver (toolstack/migrate.py),
# wherever the backend runs (dom0 or a driver domain's own hotplug step).
MIGRATION_SHARING_KEY = "xenbed-migrating"
HOTPLUG_KEYS = ("physical-device", "physical-device-path", "hotplug-status", "hotplug-error")


def parse_mode(mode: str | None) -> tuple[bool, bool]:
    """(readonly, force_shared) of a `mode` node: "r", "w", "w!" (xl's syntax)."""
    mode = (mode or "w").strip()
    if mode in ("r", "ro"):
        return True, False
    if mode in ("w", "rw"):
        return False, False
    if mode in ("w!", "rw!", "!"):
        return False, True
    raise HotplugError(f"mode {mode!r} is not r, w or w!")


def target_of(params: str) -> str:
    """The path in `params`; tolerates a "file:"/"phy:" prefix and a trailing comma list."""
    target = params.strip()
    for prefix in ("file:", "phy:", "aio:"):
        if target.startswith(prefix):
            target = target[len(prefix):]
    if not target:
        raise HotplugError("params is empty")
    return target


def add(store, backend: str) -> loop.LoopDevice:
    """Bring the backing store online for `backend`; returns the device used."""
    try:
        params = store.try_read(f"{backend}/params")
        if params is None:
            raise HotplugError(f"{backend}/params is missing")
        target = target_of(params)
        readonly, shared = parse_mode(store.try_read(f"{backend}/mode"))
        # A live migration's destination on shared storage: the source host's
        # loop device still holds the image read-write, and on one kernel the
        # two "hosts" share loop devices; reuse it, as "w!" does (on Xen the
        # check is per host and the hosts are two machines).  The receiver
        # says so in the backend dir.
        shared = shared or store.try_read(f"{backend}/{MIGRATION_SHARING_KEY}") == "1"
        dev = _bring_online(target, readonly, shared)
    except (HotplugError, OSError) as exc:
        message = str(exc)
        log.error("%s: hotplug add failed: %s", backend, message)
        write_error(store, backend, message)
        raise HotplugError(message) from exc

    def publish(tx: int) -> None:
        store.write(f"{backend}/physical-device", dev.physical_device, tx)
        store.write(f"{backend}/physical-device-path", dev.path, tx)
        store.write(f"{backend}/hotplug-status", "connected", tx)

    try:
        store.run_transaction(publish)
    except BaseException:
        if dev.major == loop.LOOP_MAJOR and dev.backing_file != dev.path:
            loop.detach(dev)
        raise
    log.info("%s: %s on %s (physical-device %s, %s)", backend, target, dev.path, dev.physical_device,
             "read-only" if readonly else "read-write")
    return dev


# A loop device with autoclear is freed by the kernel after its last close,
# asynchronously: a restarted blkback may run this step while the loop the
# old one held is still going away.
RELEASE_WAIT = 5.0


def _attach_when_free(target: str, readonly: bool) -> loop.LoopDevice:
    deadline = time.monotonic() + RELEASE_WAIT
    while True:
        try:
            return loop.attach(target, readonly)
        except loop.FileBusy:
            going = all(info.autoclear for _, info in loop.find_by_backing_file(target))
            if not going or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _bring_online(target: str, readonly: bool, shared: bool) -> loop.LoopDevice:
    """The device for `target`: a block device as it is, a regular file on a new loop device."""
    try:
        st = os.stat(target)
    except OSError as exc:
        raise HotplugError(f"{target}: {exc.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        return loop.LoopDevice(target, os.major(st.st_rdev), os.minor(st.st_rdev), target, readonly)
    if not stat.S_ISREG(st.st_mode):
        raise HotplugError(f"{target} is neither a regular file nor a block device")
    if shared:
        # "w!": the user accepts sharing; only a read-write attachment here is refused by attach,
        # so reuse an existing one instead.
        existing = loop.find_by_backing_file(target)
        return existing[0][0] if existing else loop.attach(target, readonly)
    return _attach_when_free(target, readonly)


def _loop_identity(physdev: str | None) -> tuple[int, int, int] | None:
    """(loop number, st_dev, st_ino of its backing file) of a `physical-device`
    naming an attached loop device; None for anything else."""
    if not physdev:
        return None
    try:
        major, minor = loop.parse_physical_device(physdev)
    except ValueError:
        return None
    if major != loop.LOOP_MAJOR:
        return None
    try:
        info = loop.get_status(minor)
    except OSError:
        return None  # not attached (any more)
    return minor, info.device, info.inode


def change(store, backend: str) -> loop.LoopDevice | None:
    """Media change: the medium `params` now names goes in (None: the drive
    is empty), the old one's loop device is released.  See the module doc."""
    old_physdev = store.try_read(f"{backend}/physical-device")
    # Who backs the old loop, learnt while blkback still holds it open (so it
    # cannot have been auto-cleared and reused by someone else yet).
    old = _loop_identity(old_physdev)
    dev = None
    try:
        params = store.try_read(f"{backend}/params")
        if params is None:
            raise HotplugError(f"{backend}/params is missing")
        readonly, shared = parse_mode(store.try_read(f"{backend}/mode"))
        if params.strip():
            dev = _bring_online(target_of(params), readonly, shared)
    except (HotplugError, OSError) as exc:
        message = str(exc)
        log.error("%s: media change failed: %s", backend, message)
        try:
            store.write(f"{backend}/hotplug-error", message)
        except Exception as write_exc:
            log.warning("%s: could not write hotplug-error: %s", backend, write_exc)
        raise HotplugError(message) from exc

    def publish(tx: int) -> None:
        if dev is not None:
            store.write(f"{backend}/physical-device", dev.physical_device, tx)
            store.write(f"{backend}/physical-device-path", dev.path, tx)
        else:
            for key in ("physical-device", "physical-device-path"):
                rm_if_present(store, f"{backend}/{key}", tx)
        write_connected(store, backend, tx)

    try:
        store.run_transaction(publish)
    except BaseException:
        if dev is not None and dev.major == loop.LOOP_MAJOR and dev.backing_file != dev.path:
            loop.detach(dev)
        raise
    released = False
    if old is not None and (dev is None or dev.minor != old[0] or dev.major != loop.LOOP_MAJOR):
        released = loop.detach_if_backing(*old)
    log.info("%s: medium %s (was %s%s)", backend, f"{dev.path} ({dev.physical_device})" if dev else "ejected",
             old_physdev or "empty", ", its loop released" if released else "")
    return dev


def remove(store, backend: str) -> bool:
    """Take the backing store offline; True if a loop device was detached."""
    detached = False
    physdev = path = params = None
    try:
        physdev = store.try_read(f"{backend}/physical-device")
        path = store.try_read(f"{backend}/physical-device-path")
        params = store.try_read(f"{backend}/params")
    except Exception as exc:
        if not is_missing(exc):
            raise
    if physdev:
        try:
            major, minor = loop.parse_physical_device(physdev)
        except ValueError:
            major = minor = -1
        if major == loop.LOOP_MAJOR:
            detached = _detach_if_ours(minor, target_of(params) if params else None)
    elif path and path.startswith("/dev/loop"):
        log.info("%s: no physical-device, nothing to detach (%s)", backend, path)

    clear_keys(store, backend, HOTPLUG_KEYS)
    log.info("%s: removed (%s)", backend, "loop detached" if detached else "nothing to detach")
    return detached


def _detach_if_ours(number: int, target: str | None) -> bool:
    """Detach loopN only if it still backs `target` (a number may have been
    freed by autoclear and reused by someone else since add)."""
    if target is None:
        log.warning("loop%d: no params to check it against: leaving it alone", number)
        return False
    try:
        st = os.stat(target)
    except OSError as exc:
        log.warning("loop%d: cannot stat %s (%s): leaving it alone", number, target, exc.strerror)
        return False
    return loop.detach_if_backing(number, st.st_dev, st.st_ino)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenbed.drivers.blk.hotplug",
                                     description="Xen's block hotplug step for a vbd backend dir")
    parser.add_argument("action", choices=("add", "remove", "online", "offline", "change"))
    parser.add_argument("backend", help="backend dir, e.g. /local/domain/0/backend/vbd/1/51712")
    args = parser.parse_args(argv)

    def step(store) -> str | None:
        if args.action in ("add", "online"):
            dev = add(store, args.backend)
            return f"{dev.path} {dev.physical_device}"
        if args.action == "change":
            dev = change(store, args.backend)
            return f"{dev.path} {dev.physical_device}" if dev else "empty"
        remove(store, args.backend)
        return None

    return run_as_command("blk-hotplug", args.action, args.backend, step)


if __name__ == "__main__":
    sys.exit(main())
