"""Environment tarballs unpack only inside their directory (node.extract.safe_untar)."""

from __future__ import annotations

import io
import tarfile

import pytest

from idds_fat.node.errors import UnsafeArchiveError
from idds_fat.node.extract import safe_untar


def _tarball(*members: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member in members:
            if member.isfile():
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
            else:
                tar.addfile(member)
    return buffer.getvalue()


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def test_a_normal_tarball_with_an_absolute_interpreter_link_unpacks(tmp_path):
    # venv-pack's bin/python is an absolute link to the interpreter: it must be kept.
    data = _tarball(_file("lib/site.py"), _link("bin/python", "/usr/bin/python3"))
    safe_untar(data, tmp_path / "env")
    assert (tmp_path / "env" / "lib" / "site.py").read_bytes() == b"x"
    assert (tmp_path / "env" / "bin" / "python").readlink().as_posix() == "/usr/bin/python3"


@pytest.mark.parametrize(
    "members",
    [
        [_file("../escaped")],
        [_file("/tmp/absolute-escape")],
        [_link("out", "/tmp"), _file("out/through-the-link")],
    ],
    ids=["dot-dot", "absolute", "through-a-link"],
)
def test_members_landing_outside_are_refused(tmp_path, members):
    with pytest.raises(UnsafeArchiveError):
        safe_untar(_tarball(*members), tmp_path / "env")
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path.parent / "escaped").exists()


def test_a_tarball_that_is_not_one_is_refused(tmp_path):
    with pytest.raises(UnsafeArchiveError, match="environment archive refused"):
        safe_untar(b"not a tarball at all", tmp_path / "env")
