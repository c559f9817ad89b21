"""`localforge extract` on bad input, swept: every case ends in exactly one line on stderr that
starts "error: ", names the file, flag, key or path at fault, has the exit code the README
promises (1 for files and config values, 2 for bad command-line flags and paths), and leaves no
output file behind (nothing started). Runs `cli.main` in-process (the real entry point) to stay fast."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from localforge.extract.pipeline import Ledger, output_files
from tests.extract.pdfs import make_pdf
from tests.helpers import assert_one_line, cli_main

GOOD_MD = "# Phones\n\nThe Nokia 3310 weighs 133 g.\n"


def _files(tmp: Path) -> dict[str, Path]:
    """The inputs the cases refer to, made fresh in ``tmp``."""
    f = {}

    def put(name: str, data: bytes | str) -> Path:
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        f[name] = p
        return p

    put("good.md", GOOD_MD)
    put("empty.md", b"")
    put("empty.pdf", b"")
    put("blank.txt", "   \n\n\t\n")
    put("binary.txt", bytes(range(256)) * 8)
    put("binary.html", b"\x00\x01\x02<html>" * 100)
    put("notes.xyz", "hello")
    put("README", "no suffix")
    put("corrupt.pdf", b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog")
    put("garbage.pdf", bytes(range(256)) * 40)
    put("corrupt.docx", b"PK\x03\x04" + b"not a zip" * 20)
    put("corrupt.pptx", b"nonsense" * 40)
    put("locked.pdf", make_pdf(password="s3cret"))
    put("only-xyz/a.xyz", "x")
    (tmp / "empty-folder").mkdir()
    put("schema-bad.json", "{nope")
    put("schema-invalid.json", json.dumps({"type": 5}))
    put("schema-array.json", json.dumps({"type": "array", "items": {"type": "string"}}))
    put("schema-latin1.json", "{\"title\": \"Café\"}".encode("latin-1"))
    (tmp / "schema-dir.json").mkdir()
    put("examples-shape.json", json.dumps([{"text": "no records key"}]))
    put("cfg-bad.yaml", "chunk_size: [1, 2\n")
    put("cfg-list.yaml", "- a\n- b\n")
    put("cfg-size.yaml", "fields: 'a:str'\nchunk_size: -1\n")
    put("cfg-unknown.yaml", "fields: 'a:str'\nchunk_sise: 100\n")
    put("cfg-route.yaml", "fields: 'a:str'\nroute: 'words>3'\n")
    put("cfg-examples.yaml", "fields: 'a:str'\nexamples: 5\n")
    put("cfg-temp.yaml", "fields: 'a:str'\ntemperature: hot\n")
    put("cfg-mode.yaml", "fields: 'a:str'\npdf_mode: fast\n")
    (tmp / "cfg-dir.yaml").mkdir()
    put("a-file", "I am a file")
    (tmp / "out-folder").mkdir()
    (tmp / "progress-folder.progress.jsonl").mkdir()
    return f


F = ["--fields", "name:str, detail:str"]

# (id, arguments with {tmp} for the folder, exit code, text the one line must hold)
CASES = [
    # paths
    ("missing-file", ["{tmp}/nope.md", *F], 2, "nope.md: no such file or folder"),
    ("missing-folder", ["{tmp}/no-such-dir", *F], 2, "no-such-dir: no such file or folder"),
    ("missing-among-good", ["{tmp}/good.md", "{tmp}/nope.md", *F], 2, "nope.md: no such file"),
    ("no-paths", F, 2, "Missing argument 'PATH"),
    ("empty-folder", ["{tmp}/empty-folder", *F], 1, "empty-folder: no supported files"),
    ("folder-of-unsupported", ["{tmp}/only-xyz", *F], 1, "only-xyz: no supported files"),
    # files that cannot be read
    ("empty-md", ["{tmp}/empty.md", *F], 1, "empty.md: empty file"),
    ("empty-pdf", ["{tmp}/empty.pdf", *F], 1, "empty.pdf: empty file"),
    ("blank-txt", ["{tmp}/blank.txt", *F], 1, "blank.txt: no text found"),
    ("binary-txt", ["{tmp}/binary.txt", *F], 1, "binary.txt: binary data, not a text file"),
    ("binary-html", ["{tmp}/binary.html", *F], 1, "binary.html: binary data, not a HTML file"),
    ("unsupported", ["{tmp}/notes.xyz", *F], 1, "notes.xyz: unsupported file type '.xyz'"),
    ("no-suffix", ["{tmp}/README", *F], 1, "README: unsupported file type '(none)'"),
    ("corrupt-pdf", ["{tmp}/corrupt.pdf", *F], 1, "corrupt.pdf: cannot be read: corrupt or not a PDF file"),
    ("garbage-pdf", ["{tmp}/garbage.pdf", *F], 1, "garbage.pdf: cannot be read: corrupt or not a PDF file"),
    ("corrupt-docx", ["{tmp}/corrupt.docx", *F], 1, "corrupt.docx: cannot be read: corrupt or not a DOCX file"),
    ("corrupt-pptx", ["{tmp}/corrupt.pptx", *F], 1, "corrupt.pptx: cannot be read: corrupt or not a PPTX file"),
    ("several-bad", ["{tmp}/corrupt.pdf", "{tmp}/empty.md", *F], 1, "corrupt.pdf: cannot be read: corrupt or not a PDF file (and 1 more file failed)"),
    ("encrypted-pdf", ["{tmp}/locked.pdf", *F], 1, "locked.pdf: the PDF is encrypted; give its password with --pdf-password"),
    ("encrypted-wrong-password", ["{tmp}/locked.pdf", "--pdf-password", "nope", *F], 1,
     "locked.pdf: the PDF is encrypted and the password given (--pdf-password) does not open it"),
    # --fields
    ("fields-type", ["{tmp}/good.md", "--fields", "title:text"], 1, "--fields: field 'title' has unknown type 'text'"),
    ("fields-name", ["{tmp}/good.md", "--fields", "my title:str"], 1, "--fields: 'my title' is not a valid field name"),
    ("fields-empty", ["{tmp}/good.md", "--fields", " , "], 1, "--fields is empty"),
    ("fields-and-schema", ["{tmp}/good.md", *F, "--schema", "{tmp}/schema-array.json"], 1, "give exactly one of --schema"),
    ("no-schema", ["{tmp}/good.md"], 1, "give exactly one of --schema"),
    # schema files
    ("schema-missing", ["{tmp}/good.md", "--schema", "{tmp}/nope.json"], 1, "--schema {tmp}/nope.json: no such file"),
    ("schema-bad-json", ["{tmp}/good.md", "--schema", "{tmp}/schema-bad.json"], 1, "schema-bad.json: not valid JSON (line 1"),
    ("schema-invalid", ["{tmp}/good.md", "--schema", "{tmp}/schema-invalid.json"], 1, "schema-invalid.json: not a valid JSON Schema"),
    ("schema-array", ["{tmp}/good.md", "--schema", "{tmp}/schema-array.json"], 1, "schema-array.json: the record schema must be an object"),
    ("schema-latin1", ["{tmp}/good.md", "--schema", "{tmp}/schema-latin1.json"], 1, "schema-latin1.json: not UTF-8"),
    ("schema-folder", ["{tmp}/good.md", "--schema", "{tmp}/schema-dir.json"], 1, "schema-dir.json: a folder, not a JSON file"),
    ("schema-module", ["{tmp}/good.md", "--schema", "no_such_module:Thing"], 1, "--schema no_such_module:Thing: cannot load"),
    ("schema-word", ["{tmp}/good.md", "--schema", "nothing"], 1, "--schema nothing: expected a .json file or module:Class"),
    ("examples-missing", ["{tmp}/good.md", *F, "--examples", "{tmp}/nope.json"], 1, "--examples {tmp}/nope.json: no such file"),
    ("examples-shape", ["{tmp}/good.md", *F, "--examples", "{tmp}/examples-shape.json"], 1, "examples-shape.json: expected a list of"),
    # key=value overrides
    ("override-type", ["{tmp}/good.md", *F, "chunk_size=abc"], 1, "'chunk_size'"),
    ("override-unknown", ["{tmp}/good.md", *F, "chunk_sise=100"], 1, "'chunk_sise'"),
    ("override-range", ["{tmp}/good.md", *F, "passes=0"], 1, "'passes'"),
    ("override-literal", ["{tmp}/good.md", *F, "pdf_mode=fast"], 1, "'pdf_mode'"),
    ("override-route", ["{tmp}/good.md", *F, "route=words>3"], 1, "--route: cannot read 'words>3'"),
    ("override-no-key", ["{tmp}/good.md", *F, "=5"], 2, "=5: no such file or folder"),
    # flags
    ("flag-chunk-size", ["{tmp}/good.md", *F, "--chunk-size", "8"], 2, "--chunk-size"),
    ("flag-passes", ["{tmp}/good.md", *F, "--passes", "0"], 2, "--passes"),
    ("flag-temperature", ["{tmp}/good.md", *F, "--temperature", "-1"], 2, "--temperature"),
    ("flag-overlap-word", ["{tmp}/good.md", *F, "--overlap", "many"], 2, "--overlap"),
    ("flag-model", ["{tmp}/good.md", *F, "--model", "a,b,c"], 1, "--model 'a,b,c'"),
    # -o
    ("out-folder", ["{tmp}/good.md", *F, "-o", "{tmp}/out-folder"], 2, "-o {tmp}/out-folder: {tmp}/out-folder is a folder"),
    ("out-slash", ["{tmp}/good.md", *F, "-o", "{tmp}/new-folder/"], 2, "give a file name for the records"),
    ("out-under-file", ["{tmp}/good.md", *F, "-o", "{tmp}/a-file/out.jsonl"], 2, "{tmp}/a-file is a file, not a folder"),
    ("out-deep-under-file", ["{tmp}/good.md", *F, "-o", "{tmp}/a-file/x/y/out.jsonl"], 2, "{tmp}/a-file is a file, not a folder"),
    ("out-sidecar-folder", ["{tmp}/good.md", *F, "-o", "{tmp}/progress-folder.jsonl"], 2, "progress-folder.progress.jsonl is a folder"),
    ("out-cannot-create", ["{tmp}/good.md", *F, "-o", "/proc/localforge-test/out.jsonl"], 2, "-o /proc/localforge-test/out.jsonl"),
    # config files
    ("config-missing", ["{tmp}/good.md", "--config", "{tmp}/nope.yaml"], 1, "nope.yaml: no such config file"),
    ("config-bad-yaml", ["{tmp}/good.md", "--config", "{tmp}/cfg-bad.yaml"], 1, "cfg-bad.yaml: not valid YAML"),
    ("config-list", ["{tmp}/good.md", "--config", "{tmp}/cfg-list.yaml"], 1, "cfg-list.yaml: expected a mapping"),
    ("config-folder", ["{tmp}/good.md", "--config", "{tmp}/cfg-dir.yaml"], 1, "cfg-dir.yaml: is a folder, not a config file"),
    ("config-range", ["{tmp}/good.md", "--config", "{tmp}/cfg-size.yaml"], 1, "'chunk_size'"),
    ("config-unknown", ["{tmp}/good.md", "--config", "{tmp}/cfg-unknown.yaml"], 1, "'chunk_sise' is not known"),
    ("config-route", ["{tmp}/good.md", "--config", "{tmp}/cfg-route.yaml"], 1, "--route: cannot read 'words>3'"),
    ("config-examples", ["{tmp}/good.md", "--config", "{tmp}/cfg-examples.yaml"], 1, "examples"),
    ("config-temperature", ["{tmp}/good.md", "--config", "{tmp}/cfg-temp.yaml"], 1, "'temperature'"),
    ("config-pdf-mode", ["{tmp}/good.md", "--config", "{tmp}/cfg-mode.yaml"], 1, "'pdf_mode'"),
]


def run_main(args: list[str], tmp: Path, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setenv("LOCALFORGE_CACHE", str(tmp / "cache"))
    monkeypatch.chdir(tmp)
    code, _, err = cli_main(monkeypatch, capsys, "extract", *args)
    return code, err


def check_one_line(err: str, code: int, want_code: int, named: str) -> None:
    assert_one_line(code, err, want_code, named)


@pytest.mark.parametrize("case, args, code, named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case, args, code, named, tmp_path, monkeypatch, capsys):
    _files(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = tmp_path / "run" / "out.jsonl"
    if "-o" not in args:
        args += ["-o", str(out)]
    got, err = run_main(args, tmp_path, monkeypatch, capsys)
    check_one_line(err, got, code, named.replace("{tmp}", str(tmp_path)))
    given = Path(args[args.index("-o") + 1])
    for path in output_files(given) + output_files(out):
        assert not path.is_file(), f"{path} was left behind"
    assert not (tmp_path / "run").exists() and not (tmp_path / "new-folder").exists()


def test_read_only_output_folder(tmp_path, monkeypatch, capsys):
    """An -o in a folder this user cannot write: a chmod 500 folder, or for root (who writes
    anywhere else) /sys, where even root cannot create files."""
    _files(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        ro = Path("/sys")
    else:
        ro.chmod(0o500)
    try:
        got, err = run_main([str(tmp_path / "good.md"), *F, "-o", str(ro / "out.jsonl")], tmp_path, monkeypatch, capsys)
    finally:
        if ro != Path("/sys"):
            ro.chmod(0o700)
    check_one_line(err, got, 2, str(ro))
    assert "cannot write" in err
    assert not (ro / "out.jsonl").exists() and not (ro / "out.lock").exists()


def test_a_second_run_on_the_same_output_is_refused(tmp_path, monkeypatch, capsys):
    """While a run holds the output (its Ledger is open), another is refused in one line, and what
    the first run wrote is left as it was."""
    _files(tmp_path)
    out = tmp_path / "out.jsonl"
    first = Ledger(out)
    try:
        first.write(first.out, {"a": 1})
        got, err = run_main([str(tmp_path / "good.md"), *F, "-o", str(out)], tmp_path, monkeypatch, capsys)
        check_one_line(err, got, 1, f"-o {out}: another extract run is writing it")
        from localforge.extract.pipeline import OutputBusy

        with pytest.raises(OutputBusy):
            Ledger(out)  # in the same process too (threads, notebooks)
    finally:
        first.close()
    assert out.read_text() == '{"a": 1}\n'
    Ledger(out).close()  # released: the next run may go
