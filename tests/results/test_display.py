"""What a person sees: progress while waiting, HTML tables in Jupyter."""

from __future__ import annotations

import tqdm.auto

from idds_fat import AsyncResult, MapResult, Workflow, work
from idds_fat.results.display import WaitProgress, outcome_counts


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
