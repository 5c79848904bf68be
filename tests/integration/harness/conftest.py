"""A throwaway busybox image, built without a registry, for testing the harness itself."""

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from docker.errors import ImageNotFound

IMAGE = os.environ.get("XENBED_TEST_IMAGE", "xenbed-test/busybox:latest")
HERE = Path(__file__).parent


def _host_busybox() -> Path:
    """Debian's static busybox; installed with apt when absent (the image must not need libc)."""
    path = Path("/bin/busybox")
    if not path.exists():
        subprocess.run(["apt-get", "install", "-y", "-q", "busybox-static"], check=True,
                       stdout=subprocess.DEVNULL)
    return path


@pytest.fixture(scope="session")
def busybox_image(docker_client) -> str:
    try:
        docker_client.images.get(IMAGE)
        return IMAGE
    except ImageNotFound:
        pass
    busybox = _host_busybox()
    applets = subprocess.run([str(busybox), "--list"], check=True, capture_output=True, text=True).stdout.split()
    with tempfile.TemporaryDirectory() as root:
        bin_dir = Path(root, "bin")
        bin_dir.mkdir()
        shutil.copy2(busybox, bin_dir / "busybox")
        for applet in applets:
            if applet != "busybox":
                (bin_dir / applet).symlink_to("busybox")
        for folder in ("tmp", "proc", "sys", "dev", "etc"):
            Path(root, folder).mkdir(exist_ok=True)
        tarball = Path(root).with_suffix(".tar")
        with tarfile.open(tarball, "w") as tar:
            tar.add(root, arcname=".")
        try:
            # `docker import` is the registry-free way in; the SDK's import_image needs a URL or file path
            subprocess.run(["docker", "import", "-c", 'ENTRYPOINT ["/bin/sh"]', str(tarball), IMAGE],
                           check=True, stdout=subprocess.DEVNULL)
        finally:
            tarball.unlink()
    return IMAGE


@pytest.fixture
def tiny_compose(busybox_image, monkeypatch) -> Path:
    monkeypatch.setenv("XENBED_TEST_IMAGE", busybox_image)
    return HERE / "tiny.yml"
