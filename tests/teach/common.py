"""What the teach command tests share."""

from __future__ import annotations

from localforge.resumable import output_files
from tests.helpers import assert_one_line, cli_main


def check_bad_input(verb: str, args: list, code: int, named: str, tmp_path, monkeypatch, capsys) -> None:
    """``localforge teach VERB ARGS`` (``{tmp}`` is tmp_path; ``-o`` defaults to tmp/run/out.jsonl, a
    trailing ``-o`` means none): one line naming ``named``, exit ``code``, and no output file."""
    monkeypatch.setenv("LOCALFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run" / "out.jsonl"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args if a is not None]
    if "-o" not in args:
        args += ["-o", str(out)]
    elif args[-1] == "-o":
        args.pop()
    got, _, err = cli_main(monkeypatch, capsys, "teach", verb, *args)
    assert_one_line(got, err, code, named.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "run").exists()
    for path in output_files(out)[1:] + output_files(tmp_path / "folder")[1:]:
        assert not path.exists(), f"{path} was left behind"
