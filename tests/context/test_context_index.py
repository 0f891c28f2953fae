"""The context index: an unchanged tree is not packed again, a changed one always is."""

from __future__ import annotations

import os

from idds_fat import Workflow, work
from idds_fat.context import build_context_archive

FILES = {"helper_mod.py": "VALUE = 'first'\n", "data/table.csv": "a,b\n1,2\n"}


def _tree(root):
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_an_unchanged_tree_is_known_by_its_index_and_not_packed(tmp_path):
    source, index = _tree(tmp_path / "src"), tmp_path / "index"
    first = build_context_archive(source, index_dir=index)
    again = build_context_archive(source, index_dir=index)
    assert first.data is not None and again.data is None
    assert again.sha256 == first.sha256 and again.files == first.files == 2
    assert again.content_bytes == first.content_bytes


def test_a_rewrite_that_keeps_size_and_mtime_is_still_a_change(tmp_path):
    source, index = _tree(tmp_path / "src"), tmp_path / "index"
    first = build_context_archive(source, index_dir=index)
    module = source / "helper_mod.py"
    before = module.stat()
    module.write_text("VALUE = 'other'\n")  # same length
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime
    assert module.stat().st_size == before.st_size
    changed = build_context_archive(source, index_dir=index)
    assert changed.data is not None and changed.sha256 != first.sha256


def test_a_new_file_or_a_removed_one_is_a_change(tmp_path):
    source, index = _tree(tmp_path / "src"), tmp_path / "index"
    first = build_context_archive(source, index_dir=index)
    (source / "extra.py").write_text("")
    added = build_context_archive(source, index_dir=index)
    (source / "extra.py").unlink()
    removed = build_context_archive(source, index_dir=index)
    assert added.data is not None and added.sha256 != first.sha256
    assert removed.sha256 == first.sha256  # back to a state packed before


def test_an_unreadable_index_entry_means_packing_again(tmp_path):
    source, index = _tree(tmp_path / "src"), tmp_path / "index"
    build_context_archive(source, index_dir=index)
    for entry in index.iterdir():
        entry.write_text("not json")
    assert build_context_archive(source, index_dir=index).data is not None


@work
def read_helper():
    import helper_mod

    return helper_mod.VALUE


def test_a_second_workflow_on_the_same_tree_reuses_the_archive(tmp_path):
    source = _tree(tmp_path / "src")
    with Workflow(source_dir=source, progress=False) as first:
        assert read_helper() == "first"
    with Workflow(source_dir=source, progress=False) as second:
        assert read_helper() == "first"
    assert first.parts.archive.data is not None
    assert second.parts.archive.data is None
    assert second.parts.archive.sha256 == first.parts.archive.sha256


def test_an_index_hit_for_an_archive_the_cache_lacks_packs_it_again(tmp_path):
    source = _tree(tmp_path / "src")
    with Workflow(source_dir=source, cache=str(tmp_path / "cache-a"), progress=False):
        assert read_helper() == "first"
    # Same work dir (so the same index), another cache that never saw the archive.
    with Workflow(source_dir=source, cache=str(tmp_path / "cache-b"), progress=False) as wf:
        assert read_helper() == "first"
    assert wf.parts.archive.data is not None
