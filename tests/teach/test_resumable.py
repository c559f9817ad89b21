"""The resumable JSONL output every job shares (localforge.resumable): finished items survive and
are known on re-open, rows of unfinished items and lines cut short by a crash are dropped, a
second writer is refused, and bad output paths are one line. Plain files, no model."""

from __future__ import annotations

import json

import pytest

from localforge.errors import UsageError
from localforge.resumable import OutputBusy, ResumableOutput, check_output, output_files, sidecar


def _open(out):
    return ResumableOutput(out, done_key=lambda r: r.get("item"), row_key=lambda r: r["item"], job="test")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reopen_keeps_finished_items_and_drops_the_rest(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    with _open(out) as o:
        o.write(o.out, {"item": "a", "v": 1})
        o.write(o.rejects, {"item": "a", "why": "one chunk"})
        o.finish({"item": "a"})
        o.write(o.out, {"item": "b", "v": 2})  # b never finishes: the run was killed here
        o.write(o.rejects, {"item": "b", "why": "failed"})
    with open(out, "a") as fh:
        fh.write('{"item": "a", "half')  # a line cut short by kill -9
    with open(sidecar(out, "progress"), "a") as fh:
        fh.write('{"item": "c"')  # even the progress line may be cut
    with _open(out) as o:
        assert o.done == {"a"}
        assert _rows(out) == [{"item": "a", "v": 1}]
        assert _rows(o.rejects) == [{"item": "a", "why": "one chunk"}]
        assert [r["item"] for r in _rows(o.progress)] == ["a"] and "finished" in _rows(o.progress)[0]
        o.write(o.out, {"item": "b", "v": 2})
        o.finish({"item": "b"})
    with _open(out) as o:
        assert o.done == {"a", "b"}
    assert [r["item"] for r in _rows(out)] == ["a", "b"]


def test_a_second_writer_is_refused_until_the_first_closes(tmp_path):
    out = tmp_path / "out.jsonl"
    first = _open(out)
    try:
        with pytest.raises(OutputBusy, match=r"another test run is writing it"):
            _open(out)
    finally:
        first.close()
    _open(out).close()
    assert [p.name for p in output_files(out) if p.exists()] == ["out.jsonl", "out.progress.jsonl",
                                                                  "out.rejects.jsonl", "out.lock"]


@pytest.mark.parametrize("given, named", [
    ("{tmp}/folder", "is a folder"),
    ("{tmp}/new/", "give a file name for the rows"),
    ("{tmp}/file/out.jsonl", "is a file, not a folder"),
    ("{tmp}/bad.jsonl", "bad.progress.jsonl is a folder"),
])
def test_bad_output_paths_are_one_line(tmp_path, given, named):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.progress.jsonl").mkdir()
    with pytest.raises(UsageError) as err:
        check_output(given.replace("{tmp}", str(tmp_path)), noun="rows")
    assert named in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "new").exists()
