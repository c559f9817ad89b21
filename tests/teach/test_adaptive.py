"""`localforge teach adaptive` (two-pass adaptive teaching) with the bundled model as teacher and
student (llama.cpp in-process, the session's call cache on): what every row holds on real GSM8K
questions, the band boundaries, a teacher on a closed port (rejects, exit 1), resume after an
interruption equal to an uninterrupted run, and a sweep of bad inputs (one line, nothing written)."""

from __future__ import annotations

import json

import pytest

from localforge.errors import ConfigError
from localforge.resumable import sidecar
from localforge.teach.adaptive import BANDS, AdaptiveSettings, band, load_adaptive_settings, run
from tests.helpers import MODEL, cli_main
from tests.servers import free_port
from tests.teach.atlas import (
    SMALL,
    SMALL_ARGS,
    cache_dir,
    cached,
    gsm8k,
    needs_gsm8k,
    rows,
    write,
)
from tests.teach.common import check_bad_input

KEYS = {"probe", "score", "assessment", "band", "teaching", "teaching_tokens", "answer_with", "_provenance"}


def _check_row(row: dict, item: dict, settings: AdaptiveSettings) -> None:
    assert {k: row[k] for k in item} == item  # the input row is kept
    assert KEYS <= set(row)
    assert 0 <= row["score"] <= 1 and row["band"] == band(row["score"], settings.weak_below, settings.strong_above)
    assert 0 <= row["teaching_tokens"] <= settings.teaching_tokens
    assert (row["teaching_tokens"] == 0) == (row["teaching"] == "")
    assert isinstance(row["answer_with"], str) and isinstance(row["probe"], str)
    assert len(row["assessment"]) <= 120


def _strip(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k != "_provenance"}
                      | {"item": row["_provenance"]["item"], "line": row["_provenance"]["line"]}, sort_keys=True)


@needs_gsm8k
def test_adaptive_on_gsm8k_questions(llamacpp_backend, tmp_path, tmp_path_factory):
    backend = cached(llamacpp_backend, tmp_path_factory)
    items = gsm8k(4)
    settings = AdaptiveSettings(**SMALL)
    out = tmp_path / "out.jsonl"
    summary = run(write(tmp_path / "in.jsonl", items), out, settings, teacher=backend, student=backend)
    got = rows(out)
    assert summary.done == 4 and summary.failed == [] and summary.skipped == 0
    assert [r["_provenance"]["line"] for r in got] == [1, 2, 3, 4]
    for row, item in zip(got, items, strict=True):
        _check_row(row, item, settings)
        assert row["_provenance"]["teacher"] == {"backend": "llamacpp", "model": row["_provenance"]["teacher"]["model"]}
    assert summary.bands == {b: sum(r["band"] == b for r in got) for b in BANDS}
    assert [p["band"] for p in rows(sidecar(out, "progress"))] == [r["band"] for r in got]
    assert rows(sidecar(out, "rejects")) == []
    # a re-run skips every item and writes nothing new
    again = run(tmp_path / "in.jsonl", out, settings, teacher=backend, student=backend)
    assert again.done == 0 and again.skipped == 4 and rows(out) == got


@pytest.mark.parametrize("score, want", [(0.0, "weak"), (0.29, "weak"), (0.2999, "weak"), (0.3, "partial"),
                                         (0.5, "partial"), (0.7, "partial"), (0.7001, "strong"), (1.0, "strong")])
def test_band_boundaries(score, want):
    assert band(score) == want


def test_band_bounds_are_settings():
    assert band(0.25, weak_below=0.2, strong_above=0.25) == "partial"
    assert band(0.26, weak_below=0.2, strong_above=0.25) == "strong"
    assert band(0.5, weak_below=0.5, strong_above=0.5) == "partial"
    settings = load_adaptive_settings(None, ["weak_below=0.2", "strong_above=0.9"])
    assert (settings.weak_below, settings.strong_above) == (0.2, 0.9)
    assert settings.digest() != AdaptiveSettings().digest()  # other bands: another job, no resume across
    with pytest.raises(ConfigError, match="strong_above"):
        load_adaptive_settings(None, ["weak_below=0.8", "strong_above=0.5"])
    defaults = AdaptiveSettings()
    assert (defaults.probe_tokens, defaults.teaching_tokens, defaults.weak_below, defaults.strong_above) == (
        50, 200, 0.3, 0.7)


@needs_gsm8k
def test_a_dead_teacher_fails_every_item_with_its_reason(tmp_path, monkeypatch, capsys, tmp_path_factory):
    """The teacher on a closed port, the student in-process: each question fails at the score with
    the teacher and its URL named, in the rejects file; exit 1; nothing marked done."""
    monkeypatch.setenv("LOCALFORGE_CACHE", str(cache_dir(tmp_path_factory)))
    dead = f"http://127.0.0.1:{free_port()}/v1"
    out = tmp_path / "out.jsonl"
    code, _, err = cli_main(monkeypatch, capsys, "teach", "adaptive", str(write(tmp_path / "in.jsonl", gsm8k(2))),
                            "-o", str(out), "--teacher-backend", "openai", "--teacher-base-url", dead,
                            "--teacher-model", MODEL, "--student-backend", "llamacpp", "--student-model", MODEL,
                            "teacher.timeout=5", *SMALL_ARGS)
    assert code == 1, err
    rejects = rows(sidecar(out, "rejects"))
    assert sorted(r["line"] for r in rejects) == [1, 2]
    for r in rejects:
        assert r["stage"] == "score" and "teacher" in r["error"] and dead.rsplit("/", 1)[0] in r["error"]
        assert r["history"][0]["stage"] == "probe"  # what was done before it failed
    assert rows(out) == [] and rows(sidecar(out, "progress")) == []
    assert "0 done, 0 already done, 2 failed" in err
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and "line 1: score: teacher" in failed[0]
    assert "Traceback" not in err and "unexpected" not in err


@needs_gsm8k
def test_resume_after_an_interruption_equals_an_uninterrupted_run(llamacpp_backend, tmp_path, tmp_path_factory):
    backend = cached(llamacpp_backend, tmp_path_factory)
    src = write(tmp_path / "in.jsonl", gsm8k(4))
    settings = AdaptiveSettings(**SMALL)
    out = tmp_path / "out.jsonl"

    def stop_after_two(kind, **data):
        if kind == "item" and len(rows(sidecar(out, "progress"))) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(src, out, settings, stop_after_two, teacher=backend, student=backend)
    assert len(rows(sidecar(out, "progress"))) == 2
    with open(out, "a") as fh:
        fh.write('{"question": "Janet')  # what a kill in the middle of a write leaves
    resumed = run(src, out, settings, teacher=backend, student=backend)
    assert resumed.skipped == 2 and resumed.done == 2 and resumed.failed == []
    fresh = run(src, tmp_path / "fresh.jsonl", settings, teacher=backend, student=backend)
    assert fresh.done == 4
    got, want = [_strip(r) for r in rows(out)], [_strip(r) for r in rows(tmp_path / "fresh.jsonl")]
    assert len(got) == len(set(got)) == 4 and got == want
    assert len(rows(sidecar(out, "progress"))) == 4


# --- bad input: one line, the right exit code, nothing written ----------------------------------

BAD = [
    ("missing-input", ["{tmp}/nope.jsonl"], 2, "nope.jsonl: no such file"),
    ("input-folder", ["{tmp}/folder"], 2, "folder: a folder"),
    ("no-input", [], 2, "IN.jsonl"),
    ("two-inputs", ["{tmp}/good.jsonl", "{tmp}/good.jsonl"], 2, "give one JSONL file"),
    ("bad-json", ["{tmp}/bad-json.jsonl"], 1, "bad-json.jsonl line 2: not valid JSON"),
    ("no-question", ["{tmp}/no-question.jsonl"], 1, "line 1: \"question\" is missing"),
    ("question-number", ["{tmp}/question-number.jsonl"], 1, "line 1: \"question\" must be"),
    ("answer-number", ["{tmp}/answer-number.jsonl"], 1, "line 1: \"answer\" must be a string"),
    ("not-an-object", ["{tmp}/list-row.jsonl"], 1, "line 1: expected a JSON object"),
    ("empty-input", ["{tmp}/empty.jsonl"], 1, "empty.jsonl: no questions"),
    ("not-utf8", ["{tmp}/latin.jsonl"], 1, "latin.jsonl: not UTF-8"),
    ("no-output", ["{tmp}/good.jsonl", "-o", None], 2, "--output"),
    ("output-folder", ["{tmp}/good.jsonl", "-o", "{tmp}/folder"], 2, "-o {tmp}/folder"),
    ("output-is-input", ["{tmp}/good.jsonl", "-o", "{tmp}/good.jsonl"], 2, "that is the input file"),
    ("probe-zero", ["{tmp}/good.jsonl", "--probe-tokens", "0"], 2, "--probe-tokens"),
    ("teaching-zero", ["{tmp}/good.jsonl", "--teaching-tokens", "0"], 2, "--teaching-tokens"),
    ("answer-zero", ["{tmp}/good.jsonl", "--answer-tokens", "0"], 2, "--answer-tokens"),
    ("concurrency-zero", ["{tmp}/good.jsonl", "--concurrency", "0"], 2, "--concurrency"),
    ("weak-range", ["{tmp}/good.jsonl", "weak_below=1.5"], 1, "override 'weak_below=1.5'"),
    ("bands-crossed", ["{tmp}/good.jsonl", "weak_below=0.8", "strong_above=0.5"], 1, "strong_above"),
    ("override-unknown", ["{tmp}/good.jsonl", "probe_token=3"], 1, "'probe_token' is not known"),
    ("teacher-backend", ["{tmp}/good.jsonl", "--teacher-backend", "nope"], 2, "--teacher-backend"),
    ("student-backend", ["{tmp}/good.jsonl", "--student-backend", "nope"], 2, "--student-backend"),
    ("teacher-url-auto", ["{tmp}/good.jsonl", "--teacher-base-url", "http://127.0.0.1:1/v1"], 2, "--teacher-base-url"),
    ("student-url-bad", ["{tmp}/good.jsonl", "--student-backend", "openai", "--student-base-url", "ht!tp://x"],
     2, "--student-base-url"),
    ("config-section", ["{tmp}/good.jsonl", "--config", "{tmp}/section.yaml"], 1, "'teacher'"),
    ("config-missing", ["{tmp}/good.jsonl", "--config", "{tmp}/nope.yaml"], 1, "nope.yaml: no such config file"),
    ("student-model-missing", ["{tmp}/good.jsonl", "--student-backend", "llamacpp", "--student-model",
                               "{tmp}/no-such-model.gguf"], 1, "no-such-model.gguf"),
]


def _bad_files(tmp) -> None:
    (tmp / "folder").mkdir()
    good = json.dumps({"question": "What is 2 plus 3?"}) + "\n"
    files = {"good.jsonl": good, "bad-json.jsonl": good + '{"question": \n', "no-question.jsonl": '{"answer": "5"}\n',
             "question-number.jsonl": '{"question": 3}\n', "answer-number.jsonl": '{"question": "a", "answer": 5}\n',
             "list-row.jsonl": '["question"]\n', "empty.jsonl": "\n\n", "section.yaml": "teacher: openai\n"}
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "latin.jsonl").write_bytes('{"question": "café"}\n'.encode("latin-1"))


@pytest.mark.parametrize("case, args, code, named", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_and_writes_nothing(case, args, code, named, tmp_path, monkeypatch, capsys):
    _bad_files(tmp_path)
    check_bad_input("adaptive", args, code, named, tmp_path, monkeypatch, capsys)
