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


def _bomb(size: int) -> bytes:
    """A gzip tarball of one file of ``size`` zero bytes (a few hundred KB per 512 MiB)."""

    class Zeros(io.RawIOBase):
        def __init__(self, left: int) -> None:
            self.left = left

        def readinto(self, buffer) -> int:
            n = min(len(buffer), self.left)
            buffer[:n] = bytes(n)
            self.left -= n
            return n

    info = tarfile.TarInfo("lib/zeros.bin")
    info.size = size
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=9) as tar:
        tar.addfile(_file("lib/first.py"), io.BytesIO(b""))
        tar.addfile(info, Zeros(size))
    return out.getvalue()


def test_a_tarball_bomb_is_refused_before_it_expands_and_nothing_stays(tmp_path):
    # Issue 17, item 8: a 510 KB tarball expanded to 512 MiB on the node. A quarter
    # of that is enough to cross the default cap (64 MiB for a tarball this small).
    data = _bomb(128 * 1024 * 1024)
    assert len(data) < 256 * 1024
    dest = tmp_path / "env"
    with pytest.raises(UnsafeArchiveError, match="expands beyond"):
        safe_untar(data, dest)
    assert list(dest.iterdir()) == []  # what it wrote first is gone too


def test_a_tarball_within_its_cap_unpacks_and_an_explicit_cap_holds(tmp_path):
    data = _tarball(_file("a.txt"), _file("b.txt"), data=b"y" * 1000)
    assert safe_untar(data, tmp_path / "ok") == 2000
    with pytest.raises(UnsafeArchiveError, match="expands beyond 1500 bytes"):
        safe_untar(data, tmp_path / "capped", max_bytes=1500)
    with pytest.raises(UnsafeArchiveError, match="more than 1 members"):
        safe_untar(data, tmp_path / "counted", max_files=1)
    assert list((tmp_path / "capped").iterdir()) == list((tmp_path / "counted").iterdir()) == []


def test_a_refused_tarball_removes_only_what_it_wrote(tmp_path):
    dest = tmp_path / "env"
    dest.mkdir()
    (dest / "kept.txt").write_text("there before")
    with pytest.raises(UnsafeArchiveError):
        safe_untar(_tarball(_file("new/a.py"), _file("../escaped")), dest)
    assert [p.name for p in dest.iterdir()] == ["kept.txt"]
