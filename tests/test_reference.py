"""The README's config reference is the settings models' own: regenerated, it is the same text,
and every key of every job has a row that says what it does."""

from __future__ import annotations

from pathlib import Path

import pytest

from localforge.commands import reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_reference_is_what_the_models_say():
    text = README.read_text()
    assert reference.splice(text, reference.render()) == text, \
        "run: python -m localforge.commands.reference --write README.md"
    assert reference.main(["--check", str(README)]) == 0


@pytest.mark.parametrize(("title", "ref", "note"), reference.SECTIONS, ids=[s[0] for s in reference.SECTIONS])
def test_every_key_has_a_row_with_a_description(title, ref, note):
    model = reference._model(ref)
    got = {key: (kind, default, text) for key, kind, default, text in reference.rows(model)}
    for name, field in model.model_fields.items():
        assert (field.alias or name) in got, name
    missing = [k for k, (_, _, text) in got.items() if not text]
    assert not missing, f"{title}: keys without a description: {missing}"


def test_types_and_defaults_read_as_a_user_writes_them():
    rows = {k: (t, d) for k, t, d, _ in reference.rows(reference._model("localforge.finetune.config:FinetuneConfig"))}
    assert rows["method"] == ('"lora" \\| "dora" \\| "full" \\| "grpo"', '"lora"')
    assert rows["lora.rank"] == ('int \\| "auto"', "8")
    assert rows["lora.targets"][1] == "[q_proj, v_proj]"
    assert rows["data"][1] == "required" and rows["grpo"][0] == "section \\| null"
    pipeline = {k: (t, d) for k, t, d, _ in reference.rows(reference._model("localforge.pipeline.settings:PipelineSettings"))}
    assert pipeline["eval.general"][1] == '"<localforge>/pipeline/general.jsonl"'  # not this machine's path
    assert pipeline["extract"][0] == "section" and "dataset.holdout" in pipeline and "export.to" in pipeline


def test_check_names_the_file_when_it_drifted(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text(f"x\n{reference.BEGIN}\nold\n{reference.END}\n")
    assert reference.main(["--check", str(stale)]) == 1
    assert "--write" in capsys.readouterr().err
    assert reference.main(["--write", str(stale)]) == 0 and reference.main(["--check", str(stale)]) == 0
    (tmp_path / "plain.md").write_text("no markers")
    assert reference.main(["--check", str(tmp_path / "plain.md")]) == 1
    assert "markers" in capsys.readouterr().err
