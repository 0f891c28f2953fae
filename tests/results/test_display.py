"""What a person sees: progress while waiting, HTML tables in Jupyter."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
import tqdm.auto
from nbclient import NotebookClient

from idds_fat import AsyncResult, MapResult, Workflow, work
from idds_fat.results.display import (
    ARGUMENTS_CHARS,
    WaitProgress,
    arguments_repr,
    outcome_counts,
)


class RecordingBar:
    """Stands in for tqdm's bar to record what the progress display asked of it."""

    made: list[RecordingBar] = []

    def __init__(self, total, desc, **_):
        self.total, self.desc, self.n, self.postfixes, self.closed = total, desc, 0, [], False
        RecordingBar.made.append(self)

    def update(self, n):
        self.n += n

    def set_postfix(self, postfix, refresh=True):
        self.postfixes.append(dict(postfix))

    def refresh(self):
        self.refreshed_at = self.n

    def close(self):
        self.closed = True


def _futures():
    ok, failed, cancelled, pending = (AsyncResult("t", i, {"i": i}) for i in range(4))
    ok.set_result(1)
    failed.set_exception(ValueError("no"))
    cancelled.mark_cancelled()
    return [ok, failed, cancelled, pending]


def test_outcome_counts_tell_states_apart():
    assert outcome_counts(_futures()) == {"done": 1, "failed": 1, "cancelled": 1, "pending": 1}


def test_map_result_html_lists_jobs_with_status_and_values():
    page = MapResult(_futures())._repr_html_()
    assert "1 done, 1 failed, 1 cancelled, 1 pending" in page
    assert "failed: ValueError" in page and "<td>1</td>" in page


def test_html_escapes_user_values():
    future = AsyncResult("t", 0, {"x": "<script>"})
    future.set_result("<b>")
    page = MapResult([future])._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_blocking_map_shows_progress_with_counts(monkeypatch):
    RecordingBar.made.clear()
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    square = work(lambda x: x * x)
    with Workflow() as wf:
        assert square(multi_jobs_kwargs_list=[{"x": i} for i in range(4)]) == [0, 1, 4, 9]
        page = wf._repr_html_()
    (bar,) = RecordingBar.made
    assert bar.total == 4 and bar.n == 4 and bar.closed
    assert bar.refreshed_at == 4  # the final counts were drawn before it closed
    assert bar.postfixes[-1]["done"] == 4 and bar.postfixes[-1]["failed"] == 0
    assert "t0001" in page and "<td>4</td>" in page


def test_progress_can_be_turned_off(monkeypatch):
    RecordingBar.made.clear()
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    with WaitProgress(_futures(), "x", enabled=False):
        pass
    with Workflow(progress=False):
        work(lambda x: x)(multi_jobs_kwargs_list=[{"x": 1}, {"x": 2}])
    assert RecordingBar.made == []


def test_a_failed_job_shows_its_exception_message_in_html():
    failed = AsyncResult("t", 0, {"x": 1})
    failed.set_exception(ValueError("the learning rate <0.1> diverged\nmore detail"))
    page = failed._repr_html_()
    assert "ValueError: the learning rate &lt;0.1&gt; diverged" in page
    assert "more detail" not in page  # one line per cell
    assert "ValueError: the learning rate" in MapResult([failed])._repr_html_()


def test_an_async_result_shows_its_value_and_positional_arguments():
    with Workflow() as wf:
        future = wf.submit(_add, 2, 40, scale=1)
        assert future.result(timeout=60) == 42
    page = future._repr_html_()
    assert "<td>2, 40, scale=1</td>" in page and "<td>42</td>" in page and "done" in page


def test_arguments_text_is_short_and_survives_a_failing_repr():
    class Unprintable:
        def __repr__(self):
            raise RuntimeError("no repr")

    text = arguments_repr((list(range(10_000)), Unprintable()), {"s": "x" * 1000})
    assert len(text) <= ARGUMENTS_CHARS
    assert text.startswith("[0, 1, 2") and "<Unprintable" in text


def _add(a, b, scale):
    return (a + b) * scale


@pytest.mark.slow  # a Jupyter kernel: ~10 s
def test_progress_leaves_its_final_counts_in_a_saved_notebook(monkeypatch, tmp_path):
    # The kernel is started as "python" from PATH: make it this environment's.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    notebook = nbformat.v4.new_notebook()
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            "from idds_fat import Workflow\n"
            f"with Workflow(work_dir={str(tmp_path / 'work')!r}) as wf:\n"
            "    from idds_fat import work\n"
            "    neg = work(lambda x: -x)\n"
            "    values = neg(multi_jobs_kwargs_list=[{'x': i} for i in range(3)])\n"
            "print(values)"
        )
    )
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    saved = tmp_path / "saved.ipynb"
    nbformat.write(notebook, saved)
    outputs = nbformat.read(saved, as_version=4).cells[0].outputs
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "[0, -1, -2]" in text
    final = [line for line in text.splitlines() if "3/3" in line]
    assert final and "done=3" in final[-1] and "failed=0" in final[-1], text


def test_futures_among_arguments_show_as_the_jobs_they_stand_for():
    from idds_fat.results.futures import AsyncResult, MapResult

    first = AsyncResult("t0001", 3)
    both = MapResult([AsyncResult("t0002", 0), AsyncResult("t0002", 1)])
    # A future's own repr says "pending", stale once the text is recorded.
    assert arguments_repr((first,), {"xs": both}) == "<t0001/3>, xs=<t0002: 2 jobs>"


def test_a_large_bytes_argument_is_shortened_without_being_written_out_whole():
    blob = bytes(range(256)) * (1 << 16)  # 16 MiB: its full repr would be 64 MiB of text
    text = arguments_repr((blob,), {"i": 1})
    assert len(text) <= 200 and "16,777,216 bytes" in text and text.endswith("i=1")
    assert "16,777,216 bytes" in arguments_repr((bytearray(blob),))


def test_job_arguments_write_each_jobs_text_as_arguments_repr_does():
    from idds_fat.results.display import job_arguments

    args, kwargs = (1, "a" * 300), {"p": 1}
    entries = [None, {}, {"x": 2}, {"p": 5, "y": 3}]  # the last one overrides a shared key
    expected = [arguments_repr(args, {**kwargs, **(e or {})}) for e in entries]
    assert job_arguments(args, kwargs, entries) == expected
