"""jitmoe.jit.tuning: the persistent choice store (memory + one JSON file, atomic writes merged under a lock)."""
import json
import subprocess
import sys
import threading
import warnings

import pytest

from jitmoe.jit import tuning
from jitmoe.jit.build import runtime_tag, version_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JITMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_WARNED", set())  # every test sees its own first warning
    return tmp_path


def _file_entries(path):
    data = json.loads(path.read_text())
    assert data["jitmoe_tuning"] == tuning.FILE_FORMAT
    return data["entries"]


def test_default_path_is_per_jitmoe_version_and_runtime(cache):
    store = tuning.TuningStore("demo")
    assert store.path == cache / "tuning" / version_dir() / runtime_tag() / "demo.json"


def test_put_get_round_trip_through_memory_and_disk(cache):
    store = tuning.TuningStore("demo")
    assert store.get("a") is None and store.get("a", 7) == 7 and "a" not in store
    store.put("a", {"cfg": [1, 2], "ms": 0.5})
    assert store.get("a") == {"cfg": [1, 2], "ms": 0.5} and "a" in store
    assert _file_entries(store.path) == {"a": {"cfg": [1, 2], "ms": 0.5}}
    fresh = tuning.TuningStore("demo")
    assert fresh.get("a") == {"cfg": [1, 2], "ms": 0.5}
    assert not [p for p in store.path.parent.iterdir() if p.name.endswith(".tmp")]  # temp files renamed away


def test_values_are_stored_as_json_would_read_them(cache):
    store = tuning.TuningStore("demo")
    store.put("t", (1, 2))
    assert store.get("t") == [1, 2]


def test_file_is_read_once_lazily(cache):
    store = tuning.TuningStore("demo")
    other = tuning.TuningStore("demo")
    other.put("early", 1)  # before store's first read: visible
    assert store.get("early") == 1
    other.put("late", 2)  # after it: store keeps its snapshot until it writes itself
    assert store.get("late") is None


def test_put_merges_with_what_other_stores_wrote(cache):
    first, second = tuning.TuningStore("demo"), tuning.TuningStore("demo")
    assert first.get("x") is None and second.get("x") is None  # both read the (missing) file
    first.put("a", 1)
    second.put("b", 2)
    assert _file_entries(first.path) == {"a": 1, "b": 2}
    assert second.get("a") == 1  # merged into memory by its write
    second.put("a", 3)  # a newer choice for the same key wins on disk ...
    assert _file_entries(first.path)["a"] == 3
    assert second.get("a") == 3


def test_own_choice_is_kept_over_a_concurrent_one(cache):
    first, second = tuning.TuningStore("demo"), tuning.TuningStore("demo")
    second.get("x")
    second.put("k", "mine", persist=False)
    first.put("k", "theirs")
    second.put("other", 1)
    assert second.get("k") == "mine"


def test_stores_with_different_names_do_not_mix(cache):
    tuning.TuningStore("one").put("k", 1)
    assert tuning.TuningStore("two").get("k") is None


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"entries": {"k": 1}}',
                                     '{"jitmoe_tuning": 99, "entries": {"k": 1}}',
                                     '{"jitmoe_tuning": 1, "entries": [1]}'])
def test_corrupt_file_is_ignored_with_one_warning_then_replaced(cache, content):
    store = tuning.TuningStore("demo")
    store.path.parent.mkdir(parents=True)
    store.path.write_text(content)
    with pytest.warns(RuntimeWarning, match="ignoring"):
        assert store.get("k") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.TuningStore("demo").get("k") is None  # the same path warns only once
        store.put("k", 2)
    assert _file_entries(store.path) == {"k": 2}


def test_unwritable_cache_keeps_choices_in_memory_and_warns_once(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("JITMOE_CACHE_DIR", str(blocker / "cache"))  # a directory below a file cannot exist
    monkeypatch.setattr(tuning, "_WARNED", set())
    store = tuning.TuningStore("demo")
    with pytest.warns(RuntimeWarning, match="memory only"):
        store.put("a", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.put("b", 2)
    assert store.get("a") == 1 and store.get("b") == 2


def test_explicit_file_save_and_load(cache, tmp_path):
    store = tuning.TuningStore("demo")
    store.put("a", 1)
    store.put("b", {"x": 2}, persist=False)
    target = tmp_path / "sub" / "choices.json"
    assert store.save_file(target) == 2
    assert _file_entries(target) == {"a": 1, "b": {"x": 2}}
    other = tuning.TuningStore("other")
    assert other.load_file(target) == 2
    assert other.get("b") == {"x": 2}
    assert not other.path.exists()  # loaded choices stay in memory: the store's own file is not written
    assert other.load_file(tmp_path / "missing.json") == 0


def test_save_file_merges_into_an_existing_file(cache, tmp_path):
    target = tmp_path / "choices.json"
    first = tuning.TuningStore("one")
    first.put("a", 1, persist=False)
    first.save_file(target)
    second = tuning.TuningStore("two")
    second.put("b", 2, persist=False)
    second.save_file(target)
    assert _file_entries(target) == {"a": 1, "b": 2}


def test_load_file_ignores_a_corrupt_file(cache, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    store = tuning.TuningStore("demo")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert store.load_file(bad) == 0


def test_explicit_store_path(tmp_path):
    store = tuning.TuningStore("demo", tmp_path / "mine.json")
    store.put("k", 1)
    assert _file_entries(tmp_path / "mine.json") == {"k": 1}


@pytest.mark.parametrize("key,value,error", [(1, 1, TypeError), ("k", object(), TypeError),
                                             ("k", float("nan"), TypeError), ("k", {1j: 2}, TypeError)])
def test_bad_keys_and_values_raise(cache, key, value, error):
    with pytest.raises(error, match="key|value"):
        tuning.TuningStore("demo").put(key, value)


@pytest.mark.parametrize("name", ["", "a/b", "../x", 3, "sp ace"])
def test_bad_store_names_raise(name):
    with pytest.raises(ValueError, match="name"):
        tuning.TuningStore(name)


def test_concurrent_threads_lose_no_choice(cache):
    store = tuning.TuningStore("demo")
    threads = [threading.Thread(target=lambda i=i: [store.put(f"{i}-{j}", j) for j in range(5)]) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_file_entries(store.path)) == 30 and len(store.snapshot()) == 30


def test_concurrent_processes_lose_no_choice(cache):
    code = ("import sys; from jitmoe.jit.tuning import TuningStore\n"
            "s = TuningStore('demo')\n"
            "for j in range(10): s.put(f'{sys.argv[1]}-{j}', j)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)]) for i in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert len(_file_entries(tuning.TuningStore("demo").path)) == 30
