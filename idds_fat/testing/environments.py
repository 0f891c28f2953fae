"""Building job environments offline, for tests: wheels, a venv-pack tarball, a conda-pack
layout tarball and a local container image with this machine's Python.

Nothing here needs a package index or a registry: wheels are written by hand,
venvs installed with ``--no-index``, and the image is a rootfs copied from this
interpreter's installation (plus the shared libraries it loads) and imported
with ``podman import``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import cloudpickle

#: podman options that work on our Debian machines (crun fails there), host
#: networking so a job in the container reaches the caller's loopback service, and
#: no pulling (no registry is reachable: a missing image fails at once).
PODMAN_TEST_OPTIONS = (
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
    "--network",
    "host",
    "--pull",
    "never",
)

_IMAGE_RECIPE = 2  # bump when build_python_image changes what goes into the image


def make_wheel(directory: Path, name: str, version: str, files: Mapping[str, bytes]) -> Path:
    """Write a pure-Python wheel of ``files`` (path inside site-packages -> bytes); return it."""
    dist_info = f"{name}-{version}.dist-info"
    entries = dict(files)
    entries[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    ).encode()
    entries[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: idds-fat-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, data in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    entries[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in entries.items():
            archive.writestr(path, data)
    return wheel


def cloudpickle_files(version: str | None = None) -> dict[str, bytes]:
    """Return this interpreter's cloudpickle files, ``__version__`` changed to ``version``."""
    root = Path(cloudpickle.__file__).parent
    files = {f"cloudpickle/{p.name}": p.read_bytes() for p in root.glob("*.py")}
    if version is not None:
        init = files["cloudpickle/__init__.py"].decode()
        mark = f'__version__ = "{cloudpickle.__version__}"'
        if mark not in init:
            raise RuntimeError(f"cloudpickle/__init__.py does not say {mark}")
        files["cloudpickle/__init__.py"] = init.replace(mark, f'__version__ = "{version}"').encode()
    return files


def make_wheelhouse(directory: Path, probe: str = "fatprobe") -> Path:
    """Write wheels of a probe package and of cloudpickle (this one's version, and 2.0.0).

    ``probe`` (module ``fatprobe``) has ``VALUE = "only in the job's environment"``:
    importable nowhere else. Returns ``directory``.
    """
    make_wheel(
        directory,
        probe,
        "1.0",
        {f"{probe}/__init__.py": b'VALUE = "only in the job\'s environment"\n'},
    )
    make_wheel(directory, "cloudpickle", cloudpickle.__version__, cloudpickle_files())
    make_wheel(directory, "cloudpickle", "2.0.0", cloudpickle_files("2.0.0"))
    return directory


def offline_pip_options(wheelhouse: Path) -> tuple[str, ...]:
    """pip options that install from ``wheelhouse`` only."""
    return ("--no-index", "--find-links", str(wheelhouse))


def make_venv_pack(directory: Path, wheelhouse: Path, requirements: list[str]) -> Path:
    """Build a venv with this machine's base Python, install ``requirements``, venv-pack it.

    Returns the tarball. Raises subprocess.CalledProcessError when a step fails.
    """
    venv = directory / "packed-venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    options = offline_pip_options(wheelhouse)
    install = [*pip, "install", "-q", "--disable-pip-version-check", *options, *requirements]
    subprocess.run(install, check=True)
    out = directory / "packed-venv.tar.gz"
    venv_pack = Path(sys.executable).with_name("venv-pack")
    subprocess.run([str(venv_pack), "-p", str(venv), "-o", str(out), "-q"], check=True)
    return out


#: What ``bin/conda-unpack`` in :func:`make_conda_layout` writes, and where.
CONDA_PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"


def make_conda_layout(directory: Path, wheelhouse: Path, requirements: list[str]) -> Path:
    """Build a tarball in conda-pack's layout (conda itself cannot be installed here).

    Top level ``bin/python`` (a copy of this machine's Python, a venv's
    ``--copies`` interpreter), ``lib/python3.X/site-packages`` with
    ``requirements``, and ``bin/conda-unpack``: a Python script that, like
    conda-pack's, rewrites the build prefix placeholder in a text file
    (``etc/prefix.txt``) to where the env was unpacked. Returns the tarball.
    """
    env = directory / "conda-env"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--copies", "--without-pip", str(env)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python")]
    options = offline_pip_options(wheelhouse)
    install = [*pip, "install", "-q", "--disable-pip-version-check", *options, *requirements]
    subprocess.run(install, check=True)
    (env / "etc").mkdir()
    (env / "etc" / "prefix.txt").write_text(CONDA_PLACEHOLDER + "\n")
    unpack = env / "bin" / "conda-unpack"
    unpack.write_text(
        "#!/usr/bin/env python\n"
        "import os, sys\n"
        "prefix = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))\n"
        "path = os.path.join(prefix, 'etc', 'prefix.txt')\n"
        f"text = open(path).read().replace({CONDA_PLACEHOLDER!r}, prefix)\n"
        "open(path, 'w').write(text)\n"
        "with open(os.path.join(prefix, 'etc', 'unpacked-by'), 'w') as f:\n"
        "    f.write(sys.executable)\n"
    )
    unpack.chmod(0o755)
    out = directory / "conda-env.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        for path in sorted(env.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(env)), recursive=False)
    return out


def _shared_libraries(binaries: list[Path]) -> set[Path]:
    """The shared libraries ``binaries`` load (by ``ldd``), the dynamic loader included."""
    found: set[Path] = set()
    for binary in binaries:
        done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
        for line in done.stdout.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) > parts.index("=>") + 1:
                candidate = parts[parts.index("=>") + 1]
            elif parts and parts[0].startswith("/"):
                candidate = parts[0]
            else:
                continue
            if candidate.startswith("/"):
                found.add(Path(candidate))
    return found


_SKIPPED_STDLIB = {
    "test",
    "site-packages",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "unittest",
    "distutils",
}


def python_image_name(site_packages: Mapping[str, bytes], prefix: str = "idds-fat-test") -> str:
    """Return the content-addressed name of the image :func:`build_python_image` makes."""
    digest = hashlib.sha256()
    digest.update(f"{_IMAGE_RECIPE} {sys.version} {sys.prefix}".encode())
    for path in sorted(site_packages):
        digest.update(path.encode() + b"\0" + site_packages[path] + b"\0")
    return f"localhost/{prefix}:{digest.hexdigest()[:16]}"


def build_python_image(site_packages: Mapping[str, bytes], podman: str = "podman") -> str:
    """Import a minimal image with this machine's Python and ``site_packages``; return its name.

    The rootfs holds this interpreter's installation at the same path (its
    standard library without tests, tkinter and friends), the shared
    libraries it and its extension modules load, ``/usr/bin/python3``, and the
    given files in its site-packages. The name is a hash of all that, so an
    image already imported is reused (``podman image exists``). Raises
    subprocess.CalledProcessError when podman fails.
    """
    name = python_image_name(site_packages)
    if subprocess.run([podman, "image", "exists", name]).returncode == 0:
        return name
    prefix = Path(sys.base_prefix)
    stdlib = Path(sysconfig.get_paths(vars={"base": sys.base_prefix})["stdlib"])
    executable = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    dynload = stdlib / "lib-dynload"
    extensions = [p for p in dynload.glob("*.so") if "tkinter" not in p.name]
    libraries = _shared_libraries([executable, *extensions])
    buffer = io.BytesIO()

    def add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo(name.lstrip("/"))
        info.type, info.mode = tarfile.DIRTYPE, mode
        tar.addfile(info)

    added: set[str] = set()

    def add_file(tar: tarfile.TarFile, source: Path, name: str) -> None:
        if name.lstrip("/") not in added:  # ldd and the globs overlap
            added.add(name.lstrip("/"))
            tar.add(source, arcname=name.lstrip("/"), recursive=False)

    def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name.lstrip("/"))
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("/tmp", "/usr/bin", "/etc", "/root"):
            add_dir(tar, directory, 0o1777 if directory == "/tmp" else 0o755)
        for library in sorted(libraries):
            add_file(tar, library.resolve(), str(library))  # the file, under its linked name
        add_file(tar, executable, str(executable))
        link = tarfile.TarInfo("usr/bin/python3")
        link.type, link.linkname = tarfile.SYMTYPE, str(executable)
        tar.addfile(link)  # a link, so Python finds its prefix from the real path
        for lib in (prefix / "lib").glob("libpython*.so*"):
            add_file(tar, lib.resolve(), str(lib))
        for path in sorted(stdlib.rglob("*")):
            relative = path.relative_to(stdlib)
            if relative.parts[0] in _SKIPPED_STDLIB or path.is_dir():
                continue
            if path.suffix == ".pyc" and ".opt-" in path.name:
                continue
            if path.parent == dynload and "tkinter" in path.name:
                continue
            add_file(tar, path, str(path))
        # Where the interpreter itself looks (Debian's differs from a source build's).
        site = Path(
            subprocess.run(
                [str(executable), "-c", "import site; print(site.getsitepackages()[0])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        for relative_name, data in sorted(site_packages.items()):
            add_bytes(tar, str(site / relative_name), data)
        add_bytes(tar, "/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    tarball = buffer.getvalue()
    subprocess.run(
        [podman, "import", "-q", "-", name], input=tarball, check=True, stdout=subprocess.DEVNULL
    )
    return name


def podman_available() -> bool:
    """Whether podman and runc are installed (the container tests need both)."""
    return bool(
        shutil.which("podman") and (shutil.which("runc") or os.path.exists("/usr/sbin/runc"))
    )
