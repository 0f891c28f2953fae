from pathlib import Path

import pytest

from idds_fat.cache import DirectoryStore, HttpStore, open_store


def test_plain_path_opens_directory_store(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    assert isinstance(store, DirectoryStore)
    assert store.location == tmp_path.resolve().as_uri()


def test_file_url_opens_directory_store_on_same_directory(tmp_path: Path) -> None:
    root = tmp_path / "with space"
    key = DirectoryStore(root).put(b"shared")
    store = open_store(root.resolve().as_uri())
    assert isinstance(store, DirectoryStore)
    assert store.get(key) == b"shared"


def test_http_url_opens_http_store_with_location() -> None:
    store = open_store("http://127.0.0.1:1/cache/", token="t")
    assert isinstance(store, HttpStore)
    assert store.location == "http://127.0.0.1:1/cache"
    store.close()


@pytest.mark.parametrize("location", ["ftp://host/x", ""])
def test_unsupported_location_raises_value_error(location: str) -> None:
    with pytest.raises(ValueError, match="cache location"):
        open_store(location)
