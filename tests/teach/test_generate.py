"""`localforge teach generate` on real `localforge extract` output: records extracted by the bundled
model through a real llama.cpp server, then turned into pairs by the same model as teacher (on the
server, and in-process on torch). Every pair's spans are checked against the source document as
converted again here; ungrounded and stale values are never used; resume after kill -9; a dead
teacher; bad inputs (one line, nothing written)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from difflib import SequenceMatcher
from pathlib import Path

import pytest

from localforge.extract.convert import Converter
from localforge.extract.pipeline import ExtractSettings
from localforge.extract.pipeline import run as extract
from localforge.extract.schema import parse_fields
from localforge.resumable import sidecar
from localforge.teach.generate import (
    Fact,
    GenerateSettings,
    Item,
    answer_problem,
    check_questions,
    prepare,
    run,
    values_answer,
)
from tests.helpers import CORPUS, MODEL, cli_main, crash_then_resume, needs_corpus
from tests.teach.common import check_bad_input

pytestmark = [pytest.mark.slow, needs_corpus]

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"max_tokens": 64, "critique_tokens": 128, "attempts": 2}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def extracted(llama_server, tmp_path_factory) -> Path:
    """Records that `localforge extract` wrote from two documents (the radio sheet and a corpus page)."""
    folder = tmp_path_factory.mktemp("extracted")
    for src in (ROOT / "examples" / "radio_spec.md", CORPUS / "md" / "duck.md"):
        shutil.copy(src, folder / src.name)
    settings = ExtractSettings(schema=parse_fields("name:str, detail:str"), backend="openai", model=MODEL,
                               base_url=llama_server.url, max_tokens=160, attempts=2, chunk_size=256, cache=False)
    out = folder / "records.jsonl"
    summary = extract([folder / "radio_spec.md", folder / "duck.md"], out, settings)
    assert summary.done == 2 and summary.records >= 3
    return out


@pytest.fixture
def records(extracted, tmp_path) -> Path:
    """A copy of the records (their sources stay where extract read them)."""
    return Path(shutil.copy(extracted, tmp_path / "records.jsonl"))


def _server(llama_server, **kw) -> GenerateSettings:
    role = {"backend": "openai", "model": MODEL, "base_url": llama_server.url}
    return GenerateSettings(teacher=role, **{**SMALL, "cache": False, **kw})


def _grounded(record: dict) -> dict:
    return {k: g for k, g in record["_grounding"].items() if g["status"] != "ungrounded"}


def _norm(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def check_pairs(pairs: list[dict], records: list[dict], pairs_per_record: int = 1, judged: bool = True) -> None:
    """What every pair must hold, whatever the model said: each source is a grounded value of its
    record, found at its span in the document as converted again here, with the document's sha256
    and page; the answer states every value; the evidence is the document's own text."""
    by_id = {r["_id"]: r for r in records}
    texts: dict[str, str] = {}
    for pair in pairs:
        sources = pair["provenance"]["sources"]
        assert sources and pair["instruction"].strip() and pair["completion"].strip()
        record = by_id[sources[0]["record_id"]]
        assert {s["record_id"] for s in sources} == {record["_id"]}
        assert {s["field"] for s in sources} == set(_grounded(record))  # every grounded value, nothing else
        doc = Path(sources[0]["document"])
        if str(doc) not in texts:
            texts[str(doc)] = Converter().convert(doc).text
        text = texts[str(doc)]
        for s in sources:
            g = record["_grounding"][s["field"]]
            assert s["document_sha256"] == hashlib.sha256(doc.read_bytes()).hexdigest() \
                == record["_provenance"]["file_sha256"]
            assert s["value"] == record[s["field"]] and s["grounding"] == g["status"] and s["checked"]
            assert s["span"] == [g["start"], g["end"]] and s["page"] == g["page"]
            found = text[s["span"][0]:s["span"][1]]
            if g["status"] == "exact":
                assert found == str(s["value"])
            elif g["status"] == "normalized":
                assert _norm(found) == _norm(s["value"])
            else:
                assert SequenceMatcher(None, found.lower(), str(s["value"]).lower()).ratio() >= 0.8
            assert _norm(s["value"]) in _norm(pair["completion"])  # the answer states it
        spans = pair["provenance"]["evidence_spans"]
        assert pair["evidence"] == [text[a:b] for a, b in spans]
        assert all(any(a <= s["span"][0] and s["span"][1] <= b for a, b in spans) for s in sources)
        assert pair["answer_by"] in ("teacher", "values")
        if pair["answer_by"] == "values":
            assert "no valid JSON" in pair["answer_note"]
        review = pair["review"]
        if not judged:
            assert review is None and pair["quality"] is None and pair["feedback"] is None
            continue
        assert 0 <= pair["quality"] <= 1 and pair["quality"] == review["score"]
        for claim in review["verification"]["claims"]:
            if claim["supported"]:
                assert claim["passage_text"] == pair["evidence"][claim["passage"]]
    ids = [p["id"] for p in pairs]
    assert len(ids) == len(set(ids))
    per_record: dict[str, int] = {}
    for p in pairs:
        per_record[p["provenance"]["sources"][0]["record_id"]] = per_record.get(p["provenance"]["sources"][0]["record_id"], 0) + 1
    assert set(per_record.values()) <= {pairs_per_record}


def test_pairs_from_extract_output_through_the_cli(llama_server, records, tmp_path, monkeypatch, capsys):
    """The CLI on a real llama.cpp server: every usable record gives a pair or a reject with its
    reason, records without a grounded value are named, spans hold; a re-run skips every record;
    `teach dataset export` and `stats` read the pairs."""
    monkeypatch.setenv("LOCALFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pairs.jsonl"
    args = ["teach", "generate", str(records), "-o", str(out), "--teacher-backend", "openai", "--teacher-model", MODEL,
            "--teacher-base-url", llama_server.url, *(f"{k}={v}" for k, v in SMALL.items())]
    code, _, err = cli_main(monkeypatch, capsys, *args)
    rows = _rows(records)
    usable = [r for r in rows if _grounded(r)]
    pairs, rejects = _rows(out), _rows(sidecar(out, "rejects"))
    assert "Traceback" not in err and "unexpected" not in err
    assert code == (1 if rejects else 0), err
    assert len(pairs) + len(rejects) == len(usable)  # one pair per record, or its reject
    assert pairs, f"no pair was made: {rejects}"
    check_pairs(pairs, rows)
    for r in rejects:
        assert r["stage"] in ("questions", "answer", "critique", "verify") and r["error"] and r["record_id"]
    unused = [n for n, r in enumerate(rows, 1) if not _grounded(r)]
    if unused:
        assert f"{len(unused)} records without a usable grounded value (lines {', '.join(map(str, unused))})" in err
    assert f"{len(pairs)} done, 0 already done, {len(rejects)} failed" in err
    assert len(_rows(sidecar(out, "progress"))) == len(pairs)

    code, _, err = cli_main(monkeypatch, capsys, "teach", "dataset", "export", str(out), "-o", str(tmp_path / "train.jsonl"))
    assert code == 0, err
    train = _rows(tmp_path / "train.jsonl")
    assert len(train) == len(pairs)
    for row, pair in zip(train, pairs, strict=True):
        assert row["messages"][-1] == {"role": "assistant", "content": pair["completion"]}
        assert row["metadata"]["provenance"]["sources"] == pair["provenance"]["sources"]
    code, stdout, err = cli_main(monkeypatch, capsys, "teach", "dataset", "stats", str(out), "--json")
    assert code == 0, err
    stats = json.loads(stdout)["sources"]
    assert stats["records"] == len(pairs) and stats["documents"] == len({p["provenance"]["sources"][0]["document_sha256"] for p in pairs})

    if not rejects:
        code, _, err = cli_main(monkeypatch, capsys, *args)
        assert code == 0 and f"0 done, {len(pairs)} already done" in err and _rows(out) == pairs


def test_several_pairs_per_record(llama_server, records, tmp_path):
    rows = _rows(records)
    two = _write(tmp_path / "two.jsonl", [r for r in rows if _grounded(r)][:2])
    out = tmp_path / "pairs.jsonl"
    summary = run(two, out, _server(llama_server, pairs_per_record=2, judge=False))
    pairs = _rows(out)
    assert summary.pairs == len(pairs) == 2 * summary.done and summary.done + len(summary.failed) == summary.items == 2
    assert pairs, f"no pair was made: {summary.failed}"
    check_pairs(pairs, rows, pairs_per_record=2, judged=False)
    for a, b in zip(pairs[::2], pairs[1::2], strict=True):
        assert a["id"].endswith("-0") and b["id"].endswith("-1") and _norm(a["instruction"]) != _norm(b["instruction"])


def test_torch_teacher_in_process(torch_backend, records, tmp_path):
    """The torch backend as teacher (no grammar or JSON mode: plain prompting, re-asks): the record
    gives a grounded pair, or a reject naming the stage; the summary says which."""
    one = _write(tmp_path / "one.jsonl", [next(r for r in _rows(records) if _grounded(r))])
    out = tmp_path / "pairs.jsonl"
    settings = GenerateSettings(judge=False, **SMALL, cache=False)
    summary = run(one, out, settings, teacher=torch_backend)
    pairs, rejects = _rows(out), _rows(sidecar(out, "rejects"))
    assert (summary.done, len(summary.failed)) == (len(pairs), len(rejects)) and summary.done + len(rejects) == 1
    for pair in pairs:
        assert pair["provenance"]["teacher"]["backend"] == "torch" and pair["quality"] is None
        assert {s["field"] for s in pair["provenance"]["sources"]} == set(_grounded(_rows(one)[0]))
        for s in pair["provenance"]["sources"]:
            assert _norm(s["value"]) in _norm(pair["completion"])
    for r in rejects:
        assert r["stage"] == "questions" and "torch" in r["error"]


# --- which values may be used (no model) ---------------------------------------------------------


def _record_with(extracted: Path, n: int = 2) -> dict:
    return next(r for r in _rows(extracted) if len(_grounded(r)) >= n)


def test_ungrounded_and_stale_values_are_never_facts(extracted, tmp_path):
    """An ungrounded value, one grounded more weakly than asked, and one whose span no longer holds
    it (the record was edited) are left out; a record left with none is named, not used."""
    base = next(r for r in _rows(extracted) if any(g["status"] == "exact" for g in _grounded(r).values()))
    field = next(k for k, g in _grounded(base).items() if g["status"] == "exact")
    ungrounded = json.loads(json.dumps(base))
    ungrounded["_grounding"][field] = {"status": "ungrounded", "start": None, "end": None, "page": None, "score": 0}
    edited = json.loads(json.dumps(base))
    edited[field] = "Something the document never says"
    weak = json.loads(json.dumps(base))
    weak["_grounding"][field]["status"] = "fuzzy"
    src = _write(tmp_path / "records.jsonl", [base, ungrounded, edited, weak])
    prepared = prepare(src, GenerateSettings(grounding="normalized"))
    facts = {item.line: {f.field for f in item.facts} for item in prepared.items}
    assert field in facts[1]
    for line in (2, 3, 4):
        assert field not in facts.get(line, set())
    whys = dict(prepared.unused)
    others = {k for k, g in _grounded(base).items() if g["status"] in ("exact", "normalized")} - {field}
    if not others:  # a record whose one grounded value is out is not used, with the reason
        assert "1 ungrounded" in whys[2] and "its span no longer holds it" in whys[3] and "grounded only fuzzy" in whys[4]
    left = {item.line: dict(item.left_out) for item in prepared.items}
    if 2 in left:
        assert field in left[2]
    assert prepared.unchecked == 0 and all(item.checked for item in prepared.items)


def test_a_moved_document_keeps_spans_as_written_and_says_so(extracted, tmp_path):
    row = _record_with(extracted, 1)
    row["_provenance"]["source"] = str(tmp_path / "gone.md")
    prepared = prepare(_write(tmp_path / "records.jsonl", [row]), GenerateSettings())
    assert prepared.unchecked == 1
    item = prepared.items[0]
    assert not item.checked and item.passages == [] and {f.field for f in item.facts} == set(_grounded(row))


def test_records_of_unfinished_documents_and_a_cut_line_wait(extracted, tmp_path):
    rows = _rows(extracted)
    shas = sorted({r["_provenance"]["file_sha256"] for r in rows})
    assert len(shas) == 2
    src = tmp_path / "records.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"name": "cut by a cra')
    _write(sidecar(src, "progress"), [{"sha256": shas[0], "settings": "x"}])  # the other is unfinished
    prepared = prepare(src, GenerateSettings())
    assert prepared.unfinished == sum(r["_provenance"]["file_sha256"] == shas[1] for r in rows)
    assert all(item.row["_provenance"]["file_sha256"] == shas[0] for item in prepared.items)


def _item(facts: dict, left_out: dict | None = None) -> Item:
    return Item(1, {}, "k", "rid", [Fact(k, v, "exact", 0, 1, None) for k, v in facts.items()],
                list((left_out or {}).items()))


def test_an_answer_must_state_every_value_and_no_ungrounded_one():
    item = _item({"maker": "Nordwind Instruments", "battery_mah": 2000}, {"colour": "Signal orange"})
    assert answer_problem(item, "It is made by nordwind  instruments and holds 2,000 mAh.") is None
    assert "leaves out maker" in answer_problem(item, "It holds 2000 mAh.")
    assert "leaves out battery mah" in answer_problem(item, "Nordwind Instruments makes it; 20000 mAh.")
    assert "colour" in answer_problem(item, "Nordwind Instruments, 2000 mAh, in Signal Orange.")
    assert values_answer(item) == "Maker: Nordwind Instruments; Battery mah: 2000."
    assert answer_problem(item, values_answer(item)) is None


def test_questions_differ_and_do_not_give_the_answer_away():
    check = check_questions(_item({"product": "Falcon R2", "maker": "Nordwind Instruments"}))
    check({"question_1": "Who makes the Falcon R2?", "question_2": "Which company built the Falcon R2?"})
    with pytest.raises(ValueError, match="question_2: the same question twice"):
        check({"question_1": "Who makes the Falcon R2?", "question_2": "who makes the  Falcon R2?"})
    with pytest.raises(ValueError, match="gives its answer away"):
        check({"question_1": "Is the Falcon R2 made by Nordwind Instruments?", "question_2": "Who makes it?"})


# --- resume, a dead teacher ----------------------------------------------------------------------


def test_kill_mid_run_then_resume_equals_an_uninterrupted_run(llama_server, extracted, tmp_path):
    rows = [r for r in _rows(extracted) if _grounded(r)]
    assert len(rows) >= 2
    src = _write(tmp_path / "records.jsonl", rows)
    env = {**os.environ, "LOCALFORGE_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "localforge", "teach", "generate", str(src), "--teacher-backend", "openai",
            "--teacher-model", MODEL, "--teacher-base-url", llama_server.url, "--concurrency", "1", "--no-judge",
            "max_tokens=40", "attempts=1"]
    out = tmp_path / "pairs.jsonl"
    progress = sidecar(out, "progress")
    finished, resumed, fresh = crash_then_resume(args, out, progress, env, '{"instruction": "What is',
                                                 tmp_path / "fresh.jsonl")
    assert finished < len(rows), "the run finished before it could be killed"
    assert resumed.returncode == fresh.returncode, (resumed.stderr, fresh.stderr)

    def key(row):
        prov = {k: v for k, v in row["provenance"].items() if k != "created_at"}
        return json.dumps({**row, "provenance": prov, "_provenance": row["_provenance"]["item"]}, sort_keys=True)

    got, want = [key(r) for r in _rows(out)], [key(r) for r in _rows(tmp_path / "fresh.jsonl")]
    assert len(got) == len(set(got))  # nothing duplicated
    assert sorted(got) == sorted(want) and got  # nothing lost, the same pairs
    assert len(_rows(progress)) == len(_rows(sidecar(tmp_path / "fresh.jsonl", "progress")))


def test_a_dead_teacher_fails_every_record_with_its_reason(extracted, tmp_path, monkeypatch, capsys):
    from tests.servers import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"
    monkeypatch.setenv("LOCALFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pairs.jsonl"
    code, _, err = cli_main(monkeypatch, capsys, "teach", "generate", str(extracted), "-o", str(out),
                            "--teacher-backend", "openai", "--teacher-base-url", dead, "--teacher-model", MODEL,
                            "teacher.timeout=5")
    usable = sum(bool(_grounded(r)) for r in _rows(extracted))
    assert code == 1
    rejects = _rows(sidecar(out, "rejects"))
    assert len(rejects) == usable and _rows(out) == [] and _rows(sidecar(out, "progress")) == []
    assert all(r["stage"] == "questions" and "teacher" in r["error"] and "127.0.0.1" in r["error"] for r in rejects)
    assert f"0 done, 0 already done, {usable} failed" in err
    assert len([line for line in err.splitlines() if line.startswith("failed: ")]) == usable
    assert "Traceback" not in err and "unexpected" not in err


# --- bad input: one line, the right exit code, nothing written ----------------------------------

BAD = [
    ("missing-input", ["{tmp}/nope.jsonl"], 2, "nope.jsonl: no such file"),
    ("input-folder", ["{tmp}/folder"], 2, "folder: a folder"),
    ("no-input", [], 2, "Missing argument 'RECORDS.jsonl"),
    ("two-inputs", ["{tmp}/records.jsonl", "{tmp}/records.jsonl"], 2, "give one JSONL file of records"),
    ("bad-json", ["{tmp}/bad-json.jsonl"], 1, "bad-json.jsonl line 1: not valid JSON"),
    ("not-a-record", ["{tmp}/items.jsonl"], 1, "items.jsonl line 1: not a record written by `localforge extract`"),
    ("empty", ["{tmp}/empty.jsonl"], 1, "empty.jsonl: no records"),
    ("nothing-grounded", ["{tmp}/ungrounded.jsonl"], 1, "nothing to make pairs from: no record has a value grounded"),
    ("exact-only", ["{tmp}/fuzzy.jsonl", "--grounding", "exact"], 1, "grounded only fuzzy"),
    ("bad-grounding", ["{tmp}/records.jsonl", "--grounding", "loose"], 2, "--grounding 'loose'"),
    ("bad-override", ["{tmp}/records.jsonl", "grounding=loose"], 1, "override 'grounding=loose'"),
    ("zero-pairs", ["{tmp}/records.jsonl", "pairs_per_record=0"], 1, "pairs_per_record"),
    ("zero-pairs-flag", ["{tmp}/records.jsonl", "-n", "0"], 2, "--pairs-per-record"),
    ("unknown-key", ["{tmp}/records.jsonl", "threshold=0.5"], 1, "'threshold' is not known"),
    ("student-key", ["{tmp}/records.jsonl", "student.model=x"], 1, "'student' is not known"),
    ("bad-teacher", ["{tmp}/records.jsonl", "--teacher-backend", "nope"], 2, "--teacher-backend"),
    ("bad-url", ["{tmp}/records.jsonl", "--teacher-base-url", "not a url"], 2, "--teacher-base-url"),
    ("out-is-input", ["{tmp}/records.jsonl", "-o", "{tmp}/records.jsonl"], 2, "that is the input file"),
    ("out-folder", ["{tmp}/records.jsonl", "-o", "{tmp}/folder"], 2, "folder"),
    ("no-output", ["{tmp}/records.jsonl", "-o"], 2, "--output"),
]


@pytest.mark.parametrize("name,args,code,named", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(name, args, code, named, extracted, tmp_path, monkeypatch, capsys):
    rows = _rows(extracted)
    good = _record_with(extracted, 1)
    shutil.copy(extracted, tmp_path / "records.jsonl")
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad-json.jsonl").write_text("{nope\n")
    _write(tmp_path / "items.jsonl", [{"instruction": "Say hi."}])
    (tmp_path / "empty.jsonl").write_text("\n")
    none = [{**r, "_grounding": {k: {**g, "status": "ungrounded", "start": None, "end": None} for k, g in
                                 r["_grounding"].items()}} for r in rows]
    _write(tmp_path / "ungrounded.jsonl", none)
    fuzzy = {**good, "_grounding": {k: {**g, "status": "fuzzy"} for k, g in good["_grounding"].items()}}
    _write(tmp_path / "fuzzy.jsonl", [fuzzy])
    check_bad_input("generate", args, code, named, tmp_path, monkeypatch, capsys)
