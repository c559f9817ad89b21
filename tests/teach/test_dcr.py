"""`localforge teach dcr` through real backends, with the bundled model as teacher and student:
llama.cpp in-process, a real llama.cpp server, and a torch student in-process. A run that stops
at the threshold, one that runs out of iterations, the teacher on a server with the student
in-process, resume after kill -9, a teacher that is dead or dies mid-run, and a sweep of bad
inputs (one line, nothing written)."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

from localforge.resumable import sidecar
from localforge.teach.dcr import run
from localforge.teach.settings import TeachSettings
from tests.helpers import MODEL, cli_main, crash_then_resume
from tests.servers import _Handler, free_port, serve
from tests.teach.common import check_bad_input

ITEMS = [
    {"id": 1, "instruction": "What is 2 plus 3? Answer with the number."},
    {"id": 2, "instruction": "Name the capital of France.", "draft": "Berlin.",
     "evidence": ["Paris is the capital of France.", "Berlin is the capital of Germany."]},
    {"id": 3, "instruction": "Explain rain in one sentence.", "draft": "Rain is water.",
     "rubric": ["mentions clouds", "one sentence"]},
]
SMALL = {"max_tokens": 32, "critique_tokens": 160, "cache": False}


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _check_row(row: dict, item: dict, threshold: float, max_iterations: int) -> None:
    """What every output row must hold, whatever the model said."""
    assert {k: row[k] for k in item} == item  # the input row is kept
    history = row["history"]
    assert row["iterations"] == len(history) and 1 <= len(history) <= max_iterations
    assert history[0]["by"] == ("given" if item.get("draft") else "student")
    assert all(h["by"] == "teacher" for h in history[1:])
    for h in history:
        assert set(h["critique"]) == {"score", "issues", "suggestions"} and 0 <= h["score"] <= 1
        if item.get("evidence"):
            for claim in h["verification"]["claims"]:
                if claim["supported"]:
                    assert claim["passage_text"] == item["evidence"][claim["passage"]]
        else:
            assert h["verification"] is None
    # stop at the first score that reaches the threshold, else run out of iterations
    assert all(h["score"] < threshold for h in history[:-1])
    assert history[-1]["score"] >= threshold or len(history) == max_iterations
    best = max(history, key=lambda h: (h["score"], h["iteration"]))
    assert row["final"] == best["draft"] and row["score"] == best["score"]
    assert row["passed"] == (row["score"] >= threshold)


def test_stops_at_the_threshold(llamacpp_backend, tmp_path):
    """Threshold 0: every first critique passes, so one iteration per item and no rewrite."""
    out = tmp_path / "out.jsonl"
    settings = TeachSettings(threshold=0.0, max_iterations=3, **SMALL)
    summary = run(_write(tmp_path / "in.jsonl", ITEMS), out, settings,
                  teacher=llamacpp_backend, student=llamacpp_backend)
    rows = _rows(out)
    assert summary.done == summary.passed == 3 and summary.failed == [] and summary.iterations == 3
    assert [r["id"] for r in rows] == [1, 2, 3]
    for row, item in zip(rows, ITEMS, strict=True):
        _check_row(row, item, 0.0, 3)
        assert row["iterations"] == 1 and row["passed"]
    assert rows[1]["final"] == "Berlin." and rows[0]["final"].strip()  # the student's own draft
    assert rows[1]["history"][0]["verification"]["claims"] is not None
    assert len(_rows(sidecar(out, "progress"))) == 3 and _rows(sidecar(out, "rejects")) == []


def test_runs_out_of_iterations(llamacpp_backend, tmp_path):
    """Threshold 1.0, two iterations: an item the teacher does not score 1 is rewritten once,
    critiqued again, and ends with the better of its two drafts."""
    out = tmp_path / "out.jsonl"
    settings = TeachSettings(threshold=1.0, max_iterations=2, **SMALL)
    summary = run(_write(tmp_path / "in.jsonl", ITEMS), out, settings,
                  teacher=llamacpp_backend, student=llamacpp_backend)
    rows = _rows(out)
    assert summary.done == 3 and summary.failed == []
    for row, item in zip(rows, ITEMS, strict=True):
        _check_row(row, item, 1.0, 2)
    ran_out = [r for r in rows if r["iterations"] == 2]
    assert ran_out, [r["history"] for r in rows]
    for row in ran_out:
        assert row["history"][1]["by"] == "teacher" and row["history"][1]["draft"].strip()
        assert not row["passed"] or row["history"][1]["score"] == 1.0


def test_student_on_torch_in_process_teacher_on_a_server(torch_backend, llama_server, tmp_path):
    """The student drafts on torch in-process, the teacher critiques on the llama.cpp server (torch
    has no grammar or JSON mode, and the 135M model does not write a valid critique from a plain
    prompt: the teacher is where structured output is held)."""
    out = tmp_path / "out.jsonl"
    teacher = {"backend": "openai", "model": MODEL, "base_url": llama_server.url}
    settings = TeachSettings(teacher=teacher, threshold=0.0, max_iterations=2, **SMALL)
    summary = run(_write(tmp_path / "in.jsonl", [ITEMS[0]]), out, settings, student=torch_backend)
    rows = _rows(out)
    assert summary.done == 1 and summary.failed == [] and len(rows) == 1
    _check_row(rows[0], ITEMS[0], 0.0, 2)
    assert rows[0]["_provenance"]["student"]["backend"] == "torch"
    assert rows[0]["_provenance"]["teacher"]["backend"] == "openai"
    assert rows[0]["history"][0]["by"] == "student" and rows[0]["final"].strip()


def test_teacher_on_a_server_student_in_process(llama_server, tmp_path, monkeypatch, capsys):
    """The CLI with the teacher on the real llama.cpp server and the student in-process; the call
    cache answers a second run on a new output; a re-run on the same output skips every item."""
    monkeypatch.setenv("LOCALFORGE_CACHE", str(tmp_path / "cache"))
    items = _write(tmp_path / "in.jsonl", ITEMS[:2])
    args = [str(items), "--teacher-backend", "openai", "--teacher-model", MODEL, "--teacher-base-url",
            llama_server.url, "--student-backend", "llamacpp", "--student-model", MODEL, "--max-iterations", "2",
            "--threshold", "0.5", "max_tokens=32", "critique_tokens=160"]
    code, _, err = cli_main(monkeypatch, capsys, "teach", "dcr", *args, "-o", str(tmp_path / "a.jsonl"))
    assert code == 0, err
    rows = sorted(_rows(tmp_path / "a.jsonl"), key=lambda r: r["_provenance"]["line"])  # parallel: any order
    assert len(rows) == 2 and "2 done, 0 already done, 0 failed" in err
    for row, item in zip(rows, ITEMS[:2], strict=True):
        _check_row(row, item, 0.5, 2)
        assert row["_provenance"]["teacher"]["backend"] == "openai"
        assert row["_provenance"]["student"]["backend"] == "llamacpp"
    code, _, err = cli_main(monkeypatch, capsys, "teach", "dcr", *args, "-o", str(tmp_path / "b.jsonl"))
    assert code == 0, err
    strip = [{k: v for k, v in r.items() if k != "_provenance"} for r in rows]
    again = sorted(_rows(tmp_path / "b.jsonl"), key=lambda r: r["_provenance"]["line"])
    assert [{k: v for k, v in r.items() if k != "_provenance"} for r in again] == strip
    code, _, err = cli_main(monkeypatch, capsys, "teach", "dcr", *args, "-o", str(tmp_path / "a.jsonl"))
    assert code == 0 and "0 done, 2 already done" in err
    assert len(_rows(tmp_path / "a.jsonl")) == 2


def test_kill_mid_batch_then_resume_equals_an_uninterrupted_run(llama_server, tmp_path):
    items = [{"instruction": f"What is {a} plus {a + 1}? Answer with the number."} for a in range(1, 6)]
    src = _write(tmp_path / "in.jsonl", items)
    env = {**os.environ, "LOCALFORGE_CACHE": str(tmp_path / "cache")}
    server = ["--teacher-backend", "openai", "--teacher-base-url", llama_server.url,
              "--student-backend", "openai", "--student-base-url", llama_server.url]
    args = [sys.executable, "-m", "localforge", "teach", "dcr", str(src), *server, "--teacher-model", MODEL,
            "--student-model", MODEL, "--max-iterations", "1", "--concurrency", "1", "max_tokens=24",
            "critique_tokens=160"]
    out = tmp_path / "out.jsonl"
    progress = sidecar(out, "progress")
    finished, resumed, fresh = crash_then_resume(args, out, progress, env, '{"instruction": "What is',
                                                 tmp_path / "fresh.jsonl")
    assert finished < len(items), "the run finished before it could be killed"
    assert resumed.returncode == 0, resumed.stderr
    assert fresh.returncode == 0, fresh.stderr

    def key(row):
        return json.dumps({k: v for k, v in row.items() if k != "_provenance"}
                          | {"item": row["_provenance"]["item"]}, sort_keys=True)

    got, want = [key(r) for r in _rows(out)], [key(r) for r in _rows(tmp_path / "fresh.jsonl")]
    assert len(got) == len(set(got)) == len(items)  # nothing duplicated
    assert sorted(got) == sorted(want)  # nothing lost, the same answers
    assert len(_rows(progress)) == len(items)


def test_a_dead_teacher_fails_every_item_with_its_reason(tmp_path, monkeypatch, capsys):
    """A closed port: each item is failed in the rejects file with the reason, the run goes on,
    the summary counts them, exit code 1; nothing is marked done (a re-run tries them again)."""
    monkeypatch.setenv("LOCALFORGE_CACHE", str(tmp_path / "cache"))
    dead = f"http://127.0.0.1:{free_port()}/v1"
    items = [i for i in ITEMS if i.get("draft")]  # the student is never asked
    out = tmp_path / "out.jsonl"
    code, _, err = cli_main(monkeypatch, capsys, "teach", "dcr", str(_write(tmp_path / "in.jsonl", items)),
                            "-o", str(out), "--teacher-backend", "openai", "--teacher-base-url", dead,
                            "--teacher-model", MODEL, "--student-backend", "openai", "--student-base-url", dead,
                            "teacher.timeout=5")
    assert code == 1
    rejects = _rows(sidecar(out, "rejects"))
    assert sorted(r["line"] for r in rejects) == [1, 2]
    for r in rejects:
        assert r["stage"] == "critique" and "teacher" in r["error"] and dead.rsplit("/", 1)[0] in r["error"]
    assert _rows(out) == [] and _rows(sidecar(out, "progress")) == []
    assert "0 done, 0 already done, 2 failed" in err
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and "line 1: critique: teacher" in failed[0]
    assert "Traceback" not in err and "unexpected" not in err


def _proxy(upstream: str):
    """Forwards to ``upstream`` until the test shuts it down (a teacher server that dies)."""

    class Handler(_Handler):
        def do_POST(self):
            body = self._body()
            req = urllib.request.Request(upstream + self.path.removeprefix("/v1"), data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                self._send(r.status, r.read())

    server, url = serve(Handler)
    return server, url + "/v1"


def test_a_teacher_killed_mid_run_fails_the_rest_and_loses_nothing(llama_server, tmp_path):
    server, url = _proxy(llama_server.url)
    items = [{"instruction": f"Say the word number {i}.", "draft": f"Word {i}."} for i in range(3)]
    settings = TeachSettings(teacher={"backend": "openai", "model": MODEL, "base_url": url, "timeout": 4},
                             student={"backend": "openai", "model": MODEL, "base_url": llama_server.url},
                             threshold=0.0, concurrency=1, **SMALL)
    out = tmp_path / "out.jsonl"

    def on_event(kind, **data):
        if kind == "item" and data["status"] == "done":  # the teacher's server dies after one item
            server.shutdown()
            server.server_close()

    summary = run(_write(tmp_path / "in.jsonl", items), out, settings, on_event)
    done, rejects = _rows(out), _rows(sidecar(out, "rejects"))
    assert summary.done == len(done) == 1 and len(summary.failed) == len(rejects) == 2
    assert sorted([d["_provenance"]["line"] for d in done] + [r["line"] for r in rejects]) == [1, 2, 3]
    assert all(r["stage"] == "critique" and "teacher" in r["error"] for r in rejects)
    assert [p["line"] for p in _rows(sidecar(out, "progress"))] == [done[0]["_provenance"]["line"]]


# --- bad input: one line, the right exit code, nothing written ----------------------------------

BAD = [
    ("missing-input", ["{tmp}/nope.jsonl"], 2, "nope.jsonl: no such file"),
    ("input-folder", ["{tmp}/folder"], 2, "folder: a folder"),
    ("two-inputs", ["{tmp}/good.jsonl", "{tmp}/good.jsonl"], 2, "give one JSONL file"),
    ("bad-json", ["{tmp}/bad-json.jsonl"], 1, "bad-json.jsonl line 2: not valid JSON"),
    ("no-instruction", ["{tmp}/no-instruction.jsonl"], 1, "line 1: \"instruction\" is missing"),
    ("instruction-number", ["{tmp}/instruction-number.jsonl"], 1, "line 1: \"instruction\" must be"),
    ("not-an-object", ["{tmp}/list-row.jsonl"], 1, "line 1: expected a JSON object"),
    ("evidence-string", ["{tmp}/evidence.jsonl"], 1, "\"evidence\" must be a list"),
    ("draft-number", ["{tmp}/draft.jsonl"], 1, "\"draft\" must be a string"),
    ("rubric-mapping", ["{tmp}/rubric.jsonl"], 1, "\"rubric\" must be"),
    ("empty-input", ["{tmp}/empty.jsonl"], 1, "empty.jsonl: no items"),
    ("not-utf8", ["{tmp}/latin.jsonl"], 1, "latin.jsonl: not UTF-8"),
    ("no-output", ["{tmp}/good.jsonl", "-o", None], 2, "--output"),
    ("output-folder", ["{tmp}/good.jsonl", "-o", "{tmp}/folder"], 2, "-o {tmp}/folder"),
    ("output-is-input", ["{tmp}/good.jsonl", "-o", "{tmp}/good.jsonl"], 2, "that is the input file"),
    ("threshold-range", ["{tmp}/good.jsonl", "--threshold", "1.5"], 2, "--threshold"),
    ("iterations-zero", ["{tmp}/good.jsonl", "--max-iterations", "0"], 2, "--max-iterations"),
    ("concurrency-zero", ["{tmp}/good.jsonl", "--concurrency", "0"], 2, "--concurrency"),
    ("teacher-backend", ["{tmp}/good.jsonl", "--teacher-backend", "nope"], 2, "--teacher-backend"),
    ("student-backend", ["{tmp}/good.jsonl", "--student-backend", "nope"], 2, "--student-backend"),
    ("teacher-url-auto", ["{tmp}/good.jsonl", "--teacher-base-url", "http://127.0.0.1:1/v1"], 2, "--teacher-base-url"),
    ("student-url-bad", ["{tmp}/good.jsonl", "--student-backend", "openai", "--student-base-url", "ht!tp://x"],
     2, "--student-base-url"),
    ("override-threshold", ["{tmp}/good.jsonl", "threshold=2"], 1, "override 'threshold=2'"),
    ("override-unknown", ["{tmp}/good.jsonl", "teacher.bogus=1"], 1, "'teacher.bogus' is not known"),
    ("config-unknown", ["{tmp}/good.jsonl", "--config", "{tmp}/unknown.yaml"], 1, "'max_iteration' is not known"),
    ("config-section", ["{tmp}/good.jsonl", "--config", "{tmp}/section.yaml"], 1, "'teacher'"),
    ("config-backend", ["{tmp}/good.jsonl", "--config", "{tmp}/backend.yaml"], 1, "'student.backend'"),
    ("config-missing", ["{tmp}/good.jsonl", "--config", "{tmp}/nope.yaml"], 1, "nope.yaml: no such config file"),
    ("student-model-missing", ["{tmp}/good.jsonl", "--student-backend", "llamacpp", "--student-model",
                               "{tmp}/no-such-model.gguf"], 1, "no-such-model.gguf"),
]


def _bad_files(tmp: Path) -> None:
    (tmp / "folder").mkdir()
    good = json.dumps({"instruction": "Hi"}) + "\n"
    files = {
        "good.jsonl": good, "bad-json.jsonl": good + '{"instruction": \n', "no-instruction.jsonl": '{"draft": "x"}\n',
        "instruction-number.jsonl": '{"instruction": 3}\n', "list-row.jsonl": '["instruction"]\n',
        "evidence.jsonl": '{"instruction": "a", "evidence": "one passage"}\n',
        "draft.jsonl": '{"instruction": "a", "draft": 7}\n', "rubric.jsonl": '{"instruction": "a", "rubric": {"x": 1}}\n',
        "empty.jsonl": "\n\n", "unknown.yaml": "max_iteration: 2\n", "section.yaml": "teacher: openai\n",
        "backend.yaml": "student: {backend: nope}\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "latin.jsonl").write_bytes('{"instruction": "café"}\n'.encode("latin-1"))


@pytest.mark.parametrize("case, args, code, named", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_and_writes_nothing(case, args, code, named, tmp_path, monkeypatch, capsys):
    _bad_files(tmp_path)
    check_bad_input("dcr", args, code, named, tmp_path, monkeypatch, capsys)
