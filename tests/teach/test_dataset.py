"""Distillation datasets: export in the formats finetune reads, HMAC signatures (every changed byte
caught, the key never shown), verify, stats, import from a conversation log, and bad input swept.

The commands run through ``cli.main`` (``tests.helpers.cli_main``), as the console script runs them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from localforge.errors import ConfigError
from localforge.finetune.data import load_data
from localforge.teach import dataset, signing
from tests.helpers import assert_one_line, cli_main

KEY = "k3y-Zq9!not-a-real-secret-0123456789"  # what must never appear in any output
OTHER_KEY = "another-signing-key-abcdefghijklmnop"
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)

PAIRS = [
    {"id": "p1", "instruction": "What is 12 times 12?", "completion": "12 times 12 is 144.\n#### 144",
     "quality": 0.95, "feedback": "Correct and concise.", "evidence": ["12 x 12 = 144"],
     "provenance": {"sources": [{"record_id": "r-1", "document_sha256": "ab" * 32, "page": 3, "span": [10, 24]}],
                    "teacher": {"backend": "server", "model": "big-teacher"}, "prompt_sha256": "00" * 32,
                    "created_at": "2025-01-01T00:00:00+00:00"}},
    {"id": "p2", "instruction": "Name the capital of France.", "completion": "Paris — the capital of France.",
     "quality": 0.55, "feedback": "Fine, a bit wordy.", "evidence": [],
     "provenance": {"sources": [{"record_id": "r-2", "document_sha256": "cd" * 32, "page": 1, "span": [0, 5]}],
                    "teacher": {"backend": "server", "model": "big-teacher"}}},
    # DCR output: final and score, critique in the history
    {"instruction": "Explain photosynthesis in one line.", "draft": "Plants eat light.",
     "final": "Plants turn light, water and CO2 into sugar and oxygen.", "score": 0.85, "iterations": 2,
     "history": [{"draft": "Plants eat light.", "critique": {"score": 0.3, "issues": ["too vague"],
                                                             "suggestions": ["name the inputs"]}}]},
    {"instruction": "Say hi.", "completion": "Hi!", "quality": None},
]


@pytest.fixture
def lf(monkeypatch, capsys):
    """``localforge ARGS`` through cli.main: (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        return cli_main(monkeypatch, capsys, *map(str, args))

    return run


@pytest.fixture
def pairs(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS), encoding="utf-8")
    return path


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv("LOCALFORGE_SIGNING_KEY", KEY)
    monkeypatch.delenv("LOCALFORGE_SIGNING_KEY_ID", raising=False)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# --- export ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["messages", "prompt-completion"])
def test_export_is_what_finetune_reads(tmp_path, pairs, fmt):
    out = tmp_path / f"{fmt}.jsonl"
    summary = dataset.export(pairs, out, fmt=fmt, now=NOW)
    assert (summary.rows_in, summary.written) == (4, 4)
    rows = lines(out)
    ds = load_data(out)  # finetune's own reader: extra keys (metadata) are ignored, every row parses
    examples = ds.splits["train"]
    assert len(examples) == 4
    want_format = "chat" if fmt == "messages" else "completion"
    assert {e.format for e in examples} == {want_format}
    completions = [PAIRS[0]["completion"], PAIRS[1]["completion"], PAIRS[2]["final"], "Hi!"]
    if fmt == "messages":
        assert [e.messages[-1]["content"] for e in examples] == completions
        assert examples[0].messages[0] == {"role": "user", "content": PAIRS[0]["instruction"]}
    else:
        assert [e.completion for e in examples] == completions
        assert examples[1].prompt == PAIRS[1]["instruction"]
    # quality, feedback, evidence and provenance ride along under metadata
    meta = rows[0]["metadata"]
    assert meta["quality"] == 0.95 and meta["feedback"] == "Correct and concise." and meta["id"] == "p1"
    assert meta["provenance"]["sources"][0] == PAIRS[0]["provenance"]["sources"][0]
    assert meta["provenance"]["teacher"] == {"backend": "server", "model": "big-teacher"}
    assert meta["provenance"]["prompt_sha256"] == "00" * 32
    assert meta["provenance"]["created_at"] == "2025-01-01T00:00:00+00:00"
    assert meta["provenance"]["signer_key_id"] is None
    # DCR output: score is the quality, the last critique the feedback; a missing hash is computed
    assert rows[2]["metadata"]["quality"] == 0.85
    assert rows[2]["metadata"]["feedback"] == "too vague; name the inputs"
    assert rows[2]["metadata"]["provenance"]["prompt_sha256"] == dataset.prompt_sha256([], PAIRS[2]["instruction"])
    assert rows[3]["metadata"]["provenance"]["created_at"] == NOW.isoformat()
    assert set(rows[0]) == {"messages" if fmt == "messages" else "prompt", "metadata"} | (
        set() if fmt == "messages" else {"completion"})


@pytest.mark.parametrize("fmt", ["messages", "prompt-completion"])
def test_finetune_dry_run_plans_on_an_export(tmp_path, pairs, lf, tiny_llama, monkeypatch, fmt):
    """`localforge finetune CONFIG --dry-run` with the export as its data: finetune's reader and
    planner take it (tokenised with a real tokenizer), metadata and signature keys included."""
    monkeypatch.setenv("LOCALFORGE_SIGNING_KEY", KEY)
    out = tmp_path / "train.jsonl"
    code, _, err = lf("teach", "dataset", "export", pairs, "-o", out, "--format", fmt, "--sign")
    assert code == 0, err
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {tiny_llama}\ndata: {out}\nlora: {{rank: 4, alpha: 8, targets: [q_proj, v_proj]}}\n"
                      f"steps: 2\nbatch_size: 2\nmax_seq_length: 128\nbackend: torch\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    code, stdout, err = lf("finetune", config, "--dry-run", "--no-progress")
    assert code == 0, err
    kind = "chat" if fmt == "messages" else "completion"
    assert f"train: 4 rows ({kind})" in stdout and not (tmp_path / "run").exists()


# a row as `teach dcr` writes it (localforge/teach/dcr.py: the input row, final, score, iterations,
# passed, history, _provenance); the best draft is the second, so its critique is the feedback
DCR_ROW = {
    "instruction": "What is the boiling point of water at sea level?", "evidence": ["Water boils at 100 C."],
    "final": "Water boils at 100 degrees Celsius at sea level.", "score": 0.9, "iterations": 2, "passed": True,
    "history": [
        {"iteration": 1, "draft": "It boils at 90.", "by": "student",
         "critique": {"score": 0.2, "issues": ["wrong number"], "suggestions": ["say 100 C"]},
         "verification": None, "score": 0.2},
        {"iteration": 2, "draft": "Water boils at 100 degrees Celsius at sea level.", "by": "teacher",
         "critique": {"score": 0.9, "issues": [], "suggestions": ["name the unit once"]},
         "verification": None, "score": 0.9}],
    "_provenance": {"source": "items.jsonl", "line": 7, "item": "abc123", "settings": "s1",
                    "teacher": {"backend": "server", "model": "teacher-8b"},
                    "student": {"backend": "local", "model": "student-135m"},
                    "prompt_hash": "0123456789abcdef", "made_at": "2025-03-04T05:06:07Z"}}


def test_export_reads_dcr_output(tmp_path):
    src = tmp_path / "dcr.jsonl"
    src.write_text(json.dumps(DCR_ROW) + "\n")
    out = tmp_path / "out.jsonl"
    dataset.export(src, out)
    row = lines(out)[0]
    assert row["messages"][-1]["content"] == DCR_ROW["final"]
    meta = row["metadata"]
    assert meta["quality"] == 0.9 and meta["feedback"] == "name the unit once"
    assert meta["evidence"] == ["Water boils at 100 C."]
    prov = meta["provenance"]
    assert prov["sources"] == [{"source": "items.jsonl", "line": 7, "item": "abc123"}]
    assert prov["teacher"] == {"backend": "server", "model": "teacher-8b"}
    assert prov["student"] == {"backend": "local", "model": "student-135m"}
    assert (prov["prompt_sha256"], prov["created_at"]) == ("0123456789abcdef", "2025-03-04T05:06:07Z")
    s = dataset.stats(out)
    assert s["sources"]["kinds"] == {"file": 1} and s["teachers"] == {"server/teacher-8b": 1}


def test_min_quality_keeps_scored_rows_at_or_above(tmp_path, pairs, lf):
    out = tmp_path / "good.jsonl"
    code, stdout, err = lf("teach", "dataset", "export", pairs, "-o", out, "--min-quality", "0.85")
    assert code == 0, err
    assert [r["metadata"]["quality"] for r in lines(out)] == [0.95, 0.85]
    assert "wrote 2 of 4 rows" in stdout and "1 below --min-quality" in stdout and "1 unscored" in stdout


def test_export_of_an_export_round_trips(tmp_path, pairs):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    dataset.export(pairs, first, now=NOW)
    dataset.export(first, second, now=NOW)
    assert first.read_bytes() == second.read_bytes()


def test_a_failed_write_leaves_no_file_and_no_temp(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("the old, complete file\n")

    def rows():
        yield {"a": 1}
        raise RuntimeError("the disk went away")

    with pytest.raises(RuntimeError):
        dataset.write_rows_atomic(out, rows())
    assert out.read_text() == "the old, complete file\n"  # untouched, not half-replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    with pytest.raises(ConfigError, match="-o .*gone.*cannot write"):  # the folder vanished after the checks
        dataset.write_rows_atomic(tmp_path / "gone" / "x.jsonl", [{"a": 1}])


# --- signing ---------------------------------------------------------------------------------

def test_signed_export_verifies_and_the_key_is_never_shown(tmp_path, pairs, lf, keyed, monkeypatch):
    out = tmp_path / "signed.jsonl"
    outputs = []
    for args in (("export", pairs, "-o", out, "--sign"), ("export", pairs, "-o", tmp_path / "s.json", "--sign",
                                                           "--json"),
                 ("verify", out), ("verify", out, "--json"), ("stats", out), ("stats", out, "--json")):
        code, stdout, err = lf("teach", "dataset", *args)
        assert code == 0, (args, err)
        outputs += [stdout, err]
    key_id = signing.key_from_env().key_id
    rows = lines(out)
    assert all(r["signature"]["key_id"] == key_id == r["metadata"]["provenance"]["signer_key_id"] for r in rows)
    assert all(r["signature"]["alg"] == "HMAC-SHA256" and len(r["signature"]["value"]) == 64 for r in rows)
    assert f"signed with key {key_id}" in outputs[0]
    # errors that involve the key do not show it either
    monkeypatch.setenv("LOCALFORGE_SIGNING_KEY_ID", KEY)
    code, stdout, err = lf("teach", "dataset", "export", pairs, "-o", tmp_path / "x.jsonl", "--sign")
    assert_one_line(code, err, 1, "LOCALFORGE_SIGNING_KEY_ID")
    outputs += [stdout, err]
    monkeypatch.delenv("LOCALFORGE_SIGNING_KEY_ID")
    assert KEY not in repr(signing.key_from_env()) and KEY not in str(signing.key_from_env())
    for text in outputs:
        assert KEY not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 3
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


def test_canonical_form_and_signature_are_the_specified_hmac(tmp_path, pairs, keyed):
    import hashlib
    import hmac

    out = tmp_path / "signed.jsonl"
    dataset.export(pairs, out, sign=True, now=NOW)
    raw = out.read_bytes().split(b"\n")[0]
    row = json.loads(raw)
    body = {k: v for k, v in row.items() if k != "signature"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert row["signature"]["value"] == hmac.new(KEY.encode(), text, hashlib.sha256).hexdigest()
    assert row["signature"]["key_id"] == hashlib.sha256(KEY.encode()).hexdigest()[:8]
    assert "—".encode() in out.read_bytes()  # UTF-8, not \\u escapes


def test_every_single_byte_change_of_a_signed_row_is_caught(tmp_path, keyed):
    src = tmp_path / "one.jsonl"
    src.write_text(json.dumps({"instruction": "2+2?", "completion": "4 (vier, quatre — 4)", "quality": 0.75,
                               "provenance": {"sources": [{"record_id": "r9", "span": [1, 2]}]}}) + "\n")
    signed = tmp_path / "signed.jsonl"
    dataset.export(src, signed, sign=True, now=NOW)
    original = signed.read_bytes().rstrip(b"\n")
    assert dataset.verify(signed).ok
    variants = []
    for i in range(len(original)):
        for mask in (0x01, 0x20, 0x80):  # a low bit, case (e -> E keeps 1e5 == 1E5), and the UTF-8 high bit
            changed = bytearray(original)
            changed[i] ^= mask
            variants.append(bytes(changed))
    assert len(variants) == 3 * len(original) > 1000
    split = [v for v in variants if b"\n" in v]  # a byte that became a newline: checked one by one below
    whole = [v for v in variants if b"\n" not in v]
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(original + b"\n" + b"\n".join(whole) + b"\n")
    report = dataset.verify(tampered)
    assert report.counts["verified"] == 1 and report.rows == 1 + len(whole)
    assert [n for n, _, _ in report.problems] == list(range(2, 2 + len(whole)))
    assert {s for _, s, _ in report.problems} == {"tampered"}  # a key-id flip too: it no longer matches the row
    for v in split:
        one = tmp_path / "split.jsonl"
        one.write_bytes(v + b"\n")
        assert not dataset.verify(one).ok
    # the newline between two signed rows, changed: the rows run together and are caught; a CRLF
    # ending (one byte more) is caught too
    for mask in (0x01, 0x07, 0x20, 0x80):
        joined = tmp_path / "joined.jsonl"
        joined.write_bytes(original + bytes([0x0A ^ mask]) + original + b"\n")
        report = dataset.verify(joined)
        assert report.problems and report.problems[0][1] == "tampered", mask
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(original + b"\r\n")
    assert dataset.verify(crlf).problems == [(1, "tampered", "the line's bytes differ from the signed canonical form")]


def test_a_reformatted_row_with_equal_content_is_caught(tmp_path, pairs, keyed):
    """The signature covers the content; the canonical-bytes check catches what leaves it equal."""
    signed = tmp_path / "signed.jsonl"
    dataset.export(pairs, signed, sign=True)
    rows = signed.read_text(encoding="utf-8").splitlines()
    spaced = json.dumps(json.loads(rows[0]), ensure_ascii=False)  # default separators: ", " and ": "
    reordered = json.dumps(dict(reversed(json.loads(rows[1]).items())), separators=(",", ":"), ensure_ascii=False)
    escaped = json.dumps(json.loads(rows[1]), sort_keys=True, separators=(",", ":"))  # \u escapes
    (tmp_path / "re.jsonl").write_text("\n".join([rows[0], spaced, reordered, escaped]) + "\n", encoding="utf-8")
    report = dataset.verify(tmp_path / "re.jsonl")
    assert report.counts["verified"] == 1
    assert [(n, s, d) for n, s, d in report.problems] == [
        (n, "tampered", "the line's bytes differ from the signed canonical form") for n in (2, 3, 4)]


def test_hf_datasets_loads_an_export(tmp_path, pairs, keyed):
    """TRL and friends read JSONL through Hugging Face datasets: the nested metadata loads too."""
    datasets = pytest.importorskip("datasets")
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in LOG))
    dataset.import_log(log, tmp_path / "imported.jsonl")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(pairs.read_text(encoding="utf-8") + (tmp_path / "imported.jsonl").read_text(encoding="utf-8"),
                     encoding="utf-8")
    for fmt, columns in (("messages", {"messages"}), ("prompt-completion", {"prompt", "completion"})):
        out = tmp_path / f"{fmt}.jsonl"
        dataset.export(mixed, out, fmt=fmt, sign=True)
        ds = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
        assert ds.num_rows == 7 and set(ds.column_names) == columns | {"metadata", "signature"}


def test_verify_cli_reports_lines_and_exits_1(tmp_path, pairs, lf, keyed, monkeypatch):
    signed = tmp_path / "signed.jsonl"
    dataset.export(pairs, signed, sign=True, now=NOW)
    raw = signed.read_bytes().split(b"\n")
    raw[1] = raw[1].replace(b"Paris", b"Lyon!")  # tampered content on line 2
    raw[2] = raw[2][:40]  # line 3 cut: unreadable
    unsigned = json.loads(raw[3])
    del unsigned["signature"]
    unsigned["metadata"]["provenance"]["signer_key_id"] = None
    raw[3] = signing.dumps(unsigned).encode()  # line 4 unsigned
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(raw))
    code, stdout, err = lf("teach", "dataset", "verify", bad)
    assert code == 1 and err == ""
    assert "line 2: tampered" in stdout and "line 3: tampered: unreadable" in stdout
    assert "line 4: unsigned" in stdout and "line 1:" not in stdout
    assert "4 rows: 1 verified, 2 tampered, 1 unsigned" in stdout
    code, stdout, _ = lf("teach", "dataset", "verify", bad, "--json")
    report = json.loads(stdout)
    assert code == 1 and [p["line"] for p in report["problems"]] == [2, 3, 4]
    # a key the verifier does not have: unknown-key; given both keys, every row verifies
    monkeypatch.setenv("OTHER_KEY", OTHER_KEY)
    code, stdout, _ = lf("teach", "dataset", "verify", signed, "--keys", "OTHER_KEY")
    assert code == 1 and stdout.count(": unknown-key:") == 4
    code, stdout, _ = lf("teach", "dataset", "verify", signed, "--keys", "OTHER_KEY,LOCALFORGE_SIGNING_KEY")
    assert code == 0 and "4 verified" in stdout
    # a key id given explicitly (<VAR>_ID) is what the row names, and what verify looks for
    monkeypatch.setenv("LOCALFORGE_SIGNING_KEY_ID", "team-2025")
    named = tmp_path / "named.jsonl"
    dataset.export(pairs, named, sign=True)
    assert {r["signature"]["key_id"] for r in lines(named)} == {"team-2025"}
    assert dataset.verify(named).ok


def test_an_unsigned_export_is_reported_unsigned(tmp_path, pairs, lf, keyed):
    plain = tmp_path / "plain.jsonl"
    dataset.export(pairs, plain)
    code, stdout, _ = lf("teach", "dataset", "verify", plain)
    assert code == 1 and stdout.count(": unsigned:") == 4


# --- stats -----------------------------------------------------------------------------------

def test_stats(tmp_path, pairs, lf, keyed):
    signed = tmp_path / "signed.jsonl"
    dataset.export(pairs, signed, sign=True)
    code, stdout, err = lf("teach", "dataset", "stats", signed, "--json")
    assert code == 0, err
    s = json.loads(stdout)
    key_id = signing.key_from_env().key_id
    assert s["rows"] == 4 and s["formats"] == {"messages": 4} and s["signers"] == {key_id: 4}
    q = s["quality"]
    assert (q["scored"], q["unscored"], q["min"], q["max"]) == (3, 1, 0.55, 0.95)
    assert q["mean"] == pytest.approx((0.95 + 0.55 + 0.85) / 3, abs=1e-4)
    assert [b["rows"] for b in q["histogram"]] == [0, 0, 1, 0, 2]
    assert s["teachers"] == {"server/big-teacher": 2}
    assert s["sources"] == {"kinds": {"record": 2}, "documents": 2, "records": 2, "rows_with_sources": 2}
    code, stdout, _ = lf("teach", "dataset", "stats", pairs)
    assert code == 0 and "4 rows (4 pair)" in stdout and "min 0.55, mean 0.783, max 0.95" in stdout
    assert "signers: unsigned 4" in stdout and "0.8-1.0" in stdout


# --- import ----------------------------------------------------------------------------------

LOG = [
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "And times 3?"}, {"role": "assistant", "content": "12"}]},
    {"messages": [{"role": "assistant", "content": "Hello, how can I help?"},  # no user turn before it
                  {"role": "user", "content": "Weather?"},
                  {"role": "assistant", "content": "Let me look.", "tool_calls": []},
                  {"role": "tool", "content": "sunny"},
                  {"role": "assistant", "content": "Sunny."}]},  # after a tool result: skipped
]


def test_import_a_conversation_log(tmp_path, lf):
    log = tmp_path / "chats.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in LOG))
    out = tmp_path / "pairs.jsonl"
    code, stdout, err = lf("teach", "dataset", "import", log, "-o", out)
    assert code == 0, err
    assert "wrote 3 pairs from 2 conversations" in stdout and "skipped 2" in stdout
    rows = lines(out)
    assert [(r["instruction"], r["completion"]) for r in rows] == [
        ("What is 2+2?", "4"), ("And times 3?", "12"), ("Weather?", "Let me look.")]
    assert rows[2]["context"] == LOG[1]["messages"][:1]  # the greeting before the user turn
    assert "context" not in rows[0] or rows[0]["context"] == LOG[0]["messages"][:1]
    assert rows[1]["context"] == LOG[0]["messages"][:3]
    assert rows[0]["context"] == LOG[0]["messages"][:1]
    assert rows[1]["provenance"]["sources"][0]["line"] == 1 and rows[1]["provenance"]["sources"][0]["turn"] == 4
    assert rows[1]["quality"] is None
    # exported, the context comes back as the earlier messages (chat) or a transcript (prompt-completion)
    chat, plain = tmp_path / "chat.jsonl", tmp_path / "plain.jsonl"
    dataset.export(out, chat)
    dataset.export(out, plain, fmt="prompt-completion")
    assert load_data(chat).splits["train"][1].messages == LOG[0]["messages"]
    prompt = load_data(plain).splits["train"][1].prompt
    assert prompt == "System: You are terse.\n\nUser: What is 2+2?\n\nAssistant: 4\n\nUser: And times 3?\n\nAssistant:"


# --- bad input, swept --------------------------------------------------------------------------

def _bad_files(tmp_path: Path) -> None:
    good = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS)
    (tmp_path / "good.jsonl").write_text(good, encoding="utf-8")
    (tmp_path / "notjson.jsonl").write_text(good + "{not json\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "latin1.jsonl").write_bytes('{"instruction": "caf\u00e9", "completion": "x"}\n'.encode("latin-1"))
    (tmp_path / "noinstr.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (tmp_path / "quality.jsonl").write_text('{"instruction": "q", "completion": "a", "quality": 3}\n')
    (tmp_path / "array.jsonl").write_text("[1, 2]\n")
    (tmp_path / "log-nomsg.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "log-role.jsonl").write_text('{"messages": [{"role": "wizard", "content": "x"}]}\n')
    (tmp_path / "log-noanswer.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    (tmp_path / "folder").mkdir()


BAD = [
    # (args, exit code, named)
    (["export", "missing.jsonl", "-o", "out.jsonl"], 1, ["missing.jsonl"]),
    (["export", "folder", "-o", "out.jsonl"], 1, ["folder", "not a file"]),
    (["export", "notjson.jsonl", "-o", "out.jsonl"], 1, ["notjson.jsonl", "line 5", "not valid JSON"]),
    (["export", "empty.jsonl", "-o", "out.jsonl"], 1, ["empty.jsonl", "no rows"]),
    (["export", "latin1.jsonl", "-o", "out.jsonl"], 1, ["latin1.jsonl", "line 1", "UTF-8"]),
    (["export", "array.jsonl", "-o", "out.jsonl"], 1, ["array.jsonl", "line 1", "JSON object"]),
    (["export", "noinstr.jsonl", "-o", "out.jsonl"], 1, ["noinstr.jsonl", "line 1", "instruction"]),
    (["export", "quality.jsonl", "-o", "out.jsonl"], 1, ["quality.jsonl", "line 1", "quality"]),
    (["export", "good.jsonl", "-o", "out.jsonl", "--format", "alpaca"], 2, ["--format", "alpaca", "messages"]),
    (["export", "good.jsonl", "-o", "out.jsonl", "--min-quality", "1.5"], 2, ["--min-quality"]),
    (["export", "good.jsonl", "-o", "out.jsonl", "--min-quality", "-0.1"], 2, ["--min-quality"]),
    (["export", "good.jsonl", "-o", "out.jsonl", "--min-quality", "nan"], 2, ["--min-quality"]),
    (["export", "good.jsonl", "-o", "out.jsonl", "--min-quality", "high"], 2, ["--min-quality"]),
    (["export", "good.jsonl", "-o", "out.jsonl", "--sign"], 1, ["LOCALFORGE_SIGNING_KEY"]),
    (["export", "good.jsonl", "-o", "nowhere/out.jsonl"], 2, ["-o", "nowhere", "does not exist"]),
    (["export", "good.jsonl", "-o", "folder"], 2, ["-o", "folder", "is a folder"]),
    (["export", "good.jsonl", "-o", "good.jsonl"], 2, ["-o", "good.jsonl", "input"]),
    (["export", "good.jsonl"], 2, ["--output"]),
    (["verify", "missing.jsonl"], 1, ["missing.jsonl"]),
    (["verify", "empty.jsonl"], 1, ["empty.jsonl", "no rows"]),
    (["verify", "good.jsonl", "--keys", "NO_SUCH_KEY_VAR"], 1, ["NO_SUCH_KEY_VAR"]),
    (["verify", "good.jsonl", "--keys", "A,,B"], 2, ["--keys"]),
    (["verify", "good.jsonl", "--keys", "not a name"], 1, ["--keys", "not a name"]),
    (["stats", "missing.jsonl"], 1, ["missing.jsonl"]),
    (["stats", "notjson.jsonl"], 1, ["notjson.jsonl", "line 5"]),
    (["stats", "quality.jsonl"], 1, ["quality.jsonl", "line 1", "quality"]),
    (["import", "missing.jsonl", "-o", "out.jsonl"], 1, ["missing.jsonl"]),
    (["import", "notjson.jsonl", "-o", "out.jsonl"], 1, ["notjson.jsonl", "line 5"]),
    (["import", "log-nomsg.jsonl", "-o", "out.jsonl"], 1, ["log-nomsg.jsonl", "line 1", "messages"]),
    (["import", "log-role.jsonl", "-o", "out.jsonl"], 1, ["log-role.jsonl", "line 1", "role"]),
    (["import", "log-noanswer.jsonl", "-o", "out.jsonl"], 1, ["log-noanswer.jsonl", "nothing to import"]),
    (["import", "good.jsonl", "-o", "folder"], 2, ["-o", "folder"]),
    (["import", "log-role.jsonl", "-o", "nowhere/out.jsonl"], 2, ["-o", "nowhere"]),
]


@pytest.mark.parametrize(("args", "code", "named"), BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_input_is_one_line(tmp_path, monkeypatch, lf, args, code, named):
    _bad_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCALFORGE_SIGNING_KEY", raising=False)
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    got, stdout, err = lf("teach", "dataset", *args)
    assert_one_line(got, err, code, *named)
    assert stdout == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no temp file left


def test_short_key_is_refused_without_showing_it(tmp_path, pairs, lf, monkeypatch):
    monkeypatch.setenv("LOCALFORGE_SIGNING_KEY", "tiny-secret")
    code, stdout, err = lf("teach", "dataset", "export", pairs, "-o", tmp_path / "o.jsonl", "--sign")
    assert_one_line(code, err, 1, "LOCALFORGE_SIGNING_KEY", "too short")
    assert "tiny-secret" not in err + stdout and not (tmp_path / "o.jsonl").exists()
