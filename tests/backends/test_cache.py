"""The SQLite call cache: keys, hits, concurrent writers, corruption."""

from __future__ import annotations

import subprocess
import sys
import threading

from localforge.backends import Backend, ChatResult, GenerationParams
from localforge.backends.cache import CallCache, call_key, with_cache

MSG = [{"role": "user", "content": "hello"}]


class Counting(Backend):
    name = "counting"

    def __init__(self):
        super().__init__("m")
        self.calls = 0

    def generate(self, conversations, params):
        self.calls += len(conversations)
        return [ChatResult(c[-1]["content"].upper(), 1, 1, "stop", 0.5, self.name) for c in conversations]


def test_key_covers_everything_that_decides_the_answer():
    base = call_key(("b", "m"), GenerationParams(), MSG)
    assert base == call_key(("b", "m"), GenerationParams(), [dict(MSG[0])])
    assert base != call_key(("b", "other"), GenerationParams(), MSG)
    assert base != call_key(("b", "m"), GenerationParams(temperature=0.5), MSG)
    assert base != call_key(("b", "m"), GenerationParams(json_schema={"type": "object"}), MSG)
    assert base != call_key(("b", "m"), GenerationParams(), [{"role": "user", "content": "hello!"}])


def test_hits_skip_the_engine_and_are_marked(tmp_path):
    engine = Counting()
    be = with_cache(engine, tmp_path / "c.sqlite")
    first = be.chat([MSG, [{"role": "user", "content": "b"}]])
    again = be.chat([[{"role": "user", "content": "c"}], MSG])
    assert [r.text for r in again] == ["C", "HELLO"] and [r.cached for r in again] == [False, True]
    assert engine.calls == 3 and not any(r.cached for r in first)
    assert with_cache(engine, False) is engine and with_cache(engine, None) is engine


def test_concurrent_writers_threads_and_processes(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = CallCache(path)

    def write(n):
        for i in range(50):
            cache.put(f"t{n}-{i}", {"i": i})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    code = ("import sys; from localforge.backends.cache import CallCache; c = CallCache(sys.argv[1]);"
            "[c.put(f'p{sys.argv[2]}-{i}', {'i': i}) for i in range(50)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(n)]) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(p.wait(timeout=60) == 0 for p in procs)
    assert len(CallCache(path)) == 300


def test_a_corrupt_file_is_reported_and_rebuilt(tmp_path, capfd):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    cache = CallCache(path)
    assert cache.get("k") is None
    cache.put("k", {"v": 1})
    assert cache.get("k") == {"v": 1}
    err = capfd.readouterr().err
    assert f"warning: call cache {path} was unreadable" in err and "started a new one" in err
    assert list(tmp_path.glob("c.sqlite.corrupt-*"))
