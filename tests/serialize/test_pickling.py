"""Pickling calls: named failures, size caps, and the user's modules by value."""

from __future__ import annotations

import sys
import threading

import cloudpickle
import pytest

from idds_fat import ArgumentError, Workflow, work
from idds_fat.serialize import dumps_call, dumps_job_kwargs, loads, register_user_modules


def target(data, label="x", *rest, **extra):
    return data


def test_call_round_trips():
    fn, args, kwargs = loads(dumps_call(target, [1, "a"], {"k": 2}, 10**6).body)
    assert fn(*args, **kwargs) == 1


def test_unpicklable_argument_is_named_by_its_parameter():
    with pytest.raises(ArgumentError, match="argument label cannot be pickled") as info:
        dumps_call(target, [1, threading.Lock()], {}, 10**6)
    assert info.value.argument == "label"


def test_unpicklable_keyword_argument_is_named():
    with pytest.raises(ArgumentError, match="argument handle") as info:
        dumps_call(target, [1], {"handle": threading.Lock()}, 10**6)
    assert info.value.argument == "handle"


def test_oversize_argument_is_named_with_sizes():
    with pytest.raises(ArgumentError, match=r"argument data is 4.9 KB pickled") as info:
        dumps_call(target, [b"x" * 5000], {"label": "small"}, 1000)
    assert info.value.argument == "data"
    assert "max_argument_bytes" in str(info.value)


def test_arguments_over_the_cap_together_name_the_largest():
    with pytest.raises(ArgumentError, match=r"largest is label \(") as info:
        dumps_call(target, [b"x" * 400], {"label": b"y" * 600}, 1000)
    assert info.value.argument == "label"


def test_job_kwargs_failures_name_the_entry_and_key():
    with pytest.raises(ArgumentError, match=r"multi_jobs_kwargs_list\[2\]\['lock'\]"):
        dumps_job_kwargs({"lock": threading.Lock()}, 2, 10**6)
    with pytest.raises(ArgumentError, match=r"multi_jobs_kwargs_list\[0\] must be a dict"):
        dumps_job_kwargs([1, 2], 0, 10**6)


def test_bad_arguments_fail_at_the_call_site_and_submit_nothing():
    @work(map_results=True)
    def fn(x=None, **_):
        return x

    with Workflow(max_argument_bytes=10_000) as wf:
        with pytest.raises(ArgumentError, match="argument x cannot be pickled"):
            fn(x=threading.Lock())
        with pytest.raises(ArgumentError, match=r"multi_jobs_kwargs_list\[1\]\['y'\]"):
            fn(multi_jobs_kwargs_list=[{"y": 1}, {"y": b"z" * 20_000}])
        assert wf.stats["received"] == 0
        assert not (wf.work_dir / "jobs").exists()
        assert fn(x=5) == 5


def test_user_module_under_source_dir_is_registered_by_value(tmp_path, monkeypatch):
    (tmp_path / "mymod_registered.py").write_text("def f():\n    return 'from my module'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mymod_registered

    assert "mymod_registered" in register_user_modules(tmp_path)
    data = cloudpickle.dumps(mymod_registered.f)
    del sys.modules["mymod_registered"]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    assert loads(data)() == "from my module"


def test_installed_libraries_are_not_registered(tmp_path):
    added = register_user_modules(sys.prefix)
    assert not any(name.split(".")[0] in ("cloudpickle", "pytest", "numpy") for name in added)
