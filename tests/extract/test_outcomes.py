"""What a run counts as done: records that echo the request are rejects, a document whose every
chunk was rejected fails (exit 1), an encrypted PDF opens with its password."""

from __future__ import annotations

import json

import pytest

from localforge.extract.convert import Converter, DocumentError
from localforge.extract.pipeline import ExtractSettings, run, sidecar
from localforge.extract.schema import echo_of, parse_fields
from tests.extract.pdfs import make_pdf
from tests.helpers import run_cli
from tests.servers import ALIAS

SCHEMA = parse_fields("method:str, dataset:str")
EXAMPLES = [{"text": "We fine-tune BERT on SQuAD.", "records": [{"method": "BERT", "dataset": "SQuAD"}]}]


@pytest.mark.parametrize("record, text, why", [
    ({"method": "method", "dataset": "dataset"}, "We train a CNN on ImageNet.", "repeats the field names"),
    ({"method": "<Method>", "dataset": "DATASET"}, "We train a CNN on ImageNet.", "repeats the field names"),
    ({"method": "dataset", "dataset": "method"}, "We train a CNN on ImageNet.", "repeats the field names"),
    ({"method": "BERT", "dataset": "SQuAD"}, "We train a CNN on ImageNet.", "repeats the example's values"),
    ({"method": "BERT", "dataset": "SQuAD"}, "We also fine-tune BERT on SQuAD here.", None),  # really there
    ({"method": "CNN", "dataset": "ImageNet"}, "We train a CNN on ImageNet.", None),
    ({"method": "method", "dataset": "ImageNet"}, "We train a CNN on ImageNet.", None),  # one real value
    ({"method": 3, "dataset": 4}, "3 and 4", None),
])
def test_echoes_are_told_from_records(record, text, why):
    assert echo_of(record, SCHEMA, EXAMPLES, text) == why


def test_an_encrypted_pdf_opens_with_its_password(tmp_path):
    pdf = tmp_path / "locked.pdf"
    pdf.write_bytes(make_pdf("The Nokia 3310 weighs 133 g.", password="s3cret"))
    with pytest.raises(DocumentError, match="encrypted; give its password with --pdf-password"):
        Converter(cache_dir=tmp_path / "c").convert(pdf)
    doc = Converter(cache_dir=tmp_path / "c", pdf_password="s3cret").convert(pdf)
    assert "The Nokia 3310 weighs 133 g." in doc.text and doc.pages == [(0, len(doc.text), 1)]
    plain = tmp_path / "plain.pdf"
    plain.write_bytes(make_pdf("The Nokia 3310 weighs 133 g."))
    assert Converter(cache_dir=tmp_path / "d").convert(plain).text == doc.text


@pytest.mark.slow
def test_a_document_whose_every_chunk_was_rejected_fails(llama_server, tmp_path):
    """max_tokens=1 cuts every answer: no chunk yields JSON, so the document is failed, not done,
    and a re-run tries it again."""
    doc = tmp_path / "phones.md"
    doc.write_text("# Phones\n\n" + " ".join(f"The Nokia {3000 + i} weighs {100 + i} g." for i in range(30)))
    out = tmp_path / "out.jsonl"
    args = ["extract", str(doc), "-o", str(out), "--fields", "name:str, weight:str", "--backend", "openai",
            "--model", ALIAS, "--base-url", llama_server.url, "--no-cache", "--chunk-size", "128",
            "max_tokens=1", "attempts=1"]
    res = run_cli(*args, env={"LOCALFORGE_CACHE": str(tmp_path / "c")})
    assert res.returncode == 1, res.stderr
    assert f"failed: {doc}: every chunk was rejected" in res.stderr and "Traceback" not in res.stderr
    assert out.read_text() == "" and sidecar(out, "progress").read_text() == ""
    rejects = [json.loads(line) for line in sidecar(out, "rejects").read_text().splitlines()]
    assert len(rejects) > 1 and all(r["_provenance"]["source"] == str(doc) for r in rejects)
    # the same long paragraph with room to answer: several chunks, done
    settings = ExtractSettings(schema=parse_fields("name:str, weight:str"), backend="openai", model=ALIAS,
                               base_url=llama_server.url, cache=False, chunk_size=128, max_tokens=160, attempts=2)
    summary = run([doc], out, settings)
    assert summary.done == 1 and summary.failed == [] and summary.chunks > 1
