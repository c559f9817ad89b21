"""`localforge teach eval` with the bundled model as teacher and student (llama.cpp in-process, the
call cache on): 20 GSM8K questions, every figure of the report recomputed from the per-question
rows; the CLI on the same questions (answered from the cache) gives the same report; the judge
checker; the report's arithmetic on made-up rows; and a sweep of bad inputs (one line, nothing
written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localforge.resumable import sidecar
from localforge.teach.adaptive import BANDS, AdaptiveSettings, band
from localforge.teach.checkers import exact_number
from localforge.teach.evaluate import report, rows_path, run
from localforge.teach.reward import RewardConfig, outcome, teaching_reward
from tests.helpers import MODEL, assert_one_line, cli_main
from tests.teach.atlas import (
    GSM8K,
    SMALL,
    SMALL_ARGS,
    cache_dir,
    cached,
    gsm8k,
    needs_gsm8k,
    rows,
    write,
)

N = 20
FIGURES = ("n", "accuracy_without", "accuracy_with", "gain", "non_degradation_rate", "mean_teaching_tokens",
           "mean_reward")


def _expected(rows_: list[dict]) -> dict:
    """The figures, computed here from the rows without the module's code."""
    n = len(rows_)
    if not n:
        return {"n": 0} | dict.fromkeys(FIGURES[1:])
    cw = sum(r["correct_without"] for r in rows_)
    ct = sum(r["correct_with"] for r in rows_)
    degraded = sum(r["correct_without"] and not r["correct_with"] for r in rows_)
    return {"n": n, "accuracy_without": cw / n, "accuracy_with": ct / n, "gain": (ct - cw) / n,
            "non_degradation_rate": (n - degraded) / n,
            "mean_teaching_tokens": sum(r["teaching_tokens"] for r in rows_) / n,
            "mean_reward": sum(r["reward"] for r in rows_) / n}


def _same(got: dict, want: dict) -> None:
    for key in FIGURES:
        if want[key] is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(want[key], abs=1e-5), (key, got[key], want[key])


@pytest.fixture(scope="module")
def evaluated(llamacpp_backend, tmp_path_factory):
    if not GSM8K.is_file():
        pytest.skip(f"the shared GSM8K corpus is not at {GSM8K}")
    folder = tmp_path_factory.mktemp("eval")
    data = write(folder / "gsm8k.jsonl", gsm8k(N + 5))  # --limit takes the first 20
    backend = cached(llamacpp_backend, tmp_path_factory)
    settings = AdaptiveSettings(**SMALL)
    result, summary = run(data, folder / "report.json", settings, limit=N, teacher=backend, student=backend)
    return folder, data, settings, result, summary


@needs_gsm8k
def test_eval_on_20_gsm8k_questions_every_figure_from_the_rows(evaluated):
    folder, data, settings, result, summary = evaluated
    assert summary.failed == [] and summary.done == N
    on_disk = json.loads((folder / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    got = rows(rows_path(folder / "report.json"))
    assert [r["question"] for r in got] == [q["question"] for q in gsm8k(N)]  # the first 20, in order
    config = RewardConfig(token_budget=settings.teaching_tokens)
    for r in got:
        assert 0 <= r["score"] <= 1 and r["band"] == band(r["score"]) and r["band"] in BANDS
        assert r["probe"] is not None and isinstance(r["assessment"], str)
        assert r["correct_without"] == exact_number(r["answer_without"], r["answer"])
        assert r["correct_with"] == exact_number(r["answer_with"], r["answer"])
        assert r["outcome"] == outcome(r["correct_without"], r["correct_with"])
        assert r["reward"] == pytest.approx(teaching_reward(r["correct_without"], r["correct_with"],
                                                            r["teaching_tokens"], config=config), abs=1e-6)
        assert 0 <= r["teaching_tokens"] <= settings.teaching_tokens
        assert (r["teaching_tokens"] == 0) == (r["teaching"] == "")
        assert r["_provenance"]["teacher"]["backend"] == "llamacpp"
    _same(on_disk, _expected(got))
    assert on_disk["outcomes"] == {k: sum(r["outcome"] == k for r in got) for k in on_disk["outcomes"]}
    assert sum(on_disk["per_band"][b]["n"] for b in BANDS) == N
    for b in BANDS:
        _same(on_disk["per_band"][b], _expected([r for r in got if r["band"] == b]))
    assert on_disk["questions"] == N and on_disk["failed"] == 0 and on_disk["checker"] == "number"
    print("\nteach eval, 20 GSM8K questions, smollm2-135m as teacher and student (llama.cpp):\n"
          + json.dumps({k: on_disk[k] for k in (*FIGURES, "outcomes")}
                       | {"per_band": {b: {k: on_disk["per_band"][b][k] for k in FIGURES}
                                       for b in BANDS}}, indent=1))


@needs_gsm8k
def test_the_cli_gives_the_same_report_from_the_cache(evaluated, tmp_path, monkeypatch, capsys, tmp_path_factory):
    """The same questions and settings through `localforge teach eval` (a fresh llama.cpp backend,
    the same call cache): every call is a cache hit and the figures are the same; a re-run on the
    same report skips every question."""
    folder, data, _, result, _ = evaluated
    monkeypatch.setenv("LOCALFORGE_CACHE", str(cache_dir(tmp_path_factory)))
    args = ["teach", "eval", "--data", str(data), "--limit", str(N), "-o", str(tmp_path / "r.json"),
            "--teacher-backend", "llamacpp", "--teacher-model", MODEL, "--student-backend", "llamacpp",
            "--student-model", MODEL, *SMALL_ARGS]
    code, _, err = cli_main(monkeypatch, capsys, *args)
    assert code == 0, err
    again = json.loads((tmp_path / "r.json").read_text())
    _same(again, result)
    assert again["per_band"] == json.loads(json.dumps(result["per_band"]))
    assert f"{N} done, 0 already done, 0 failed" in err and "non-degradation" in err
    code, _, err = cli_main(monkeypatch, capsys, *args)
    assert code == 0 and f"0 done, {N} already done" in err
    _same(json.loads((tmp_path / "r.json").read_text()), result)


@needs_gsm8k
def test_judge_checker_asks_the_teacher(llamacpp_backend, tmp_path, tmp_path_factory):
    backend = cached(llamacpp_backend, tmp_path_factory)
    data = write(tmp_path / "q.jsonl", gsm8k(2))
    result, summary = run(data, tmp_path / "j.json", AdaptiveSettings(**SMALL, checker="judge"),
                          teacher=backend, student=backend)
    got = rows(rows_path(tmp_path / "j.json"))
    assert summary.failed == [] and len(got) == 2 and result["checker"] == "judge"
    for r in got:
        assert isinstance(r["correct_without"], bool) and isinstance(r["correct_with"], bool)
    _same(result, _expected(got))


# --- the arithmetic, on rows made by hand --------------------------------------------------------

def _row(band_: str, without: bool, with_: bool, tokens: int) -> dict:
    return {"band": band_, "correct_without": without, "correct_with": with_, "teaching_tokens": tokens,
            "outcome": outcome(without, with_), "reward": teaching_reward(without, with_, tokens)}


def test_report_arithmetic():
    made = [_row("weak", False, True, 100), _row("weak", True, False, 50), _row("partial", True, True, 20),
            _row("partial", False, False, 0), _row("partial", True, True, 0)]
    got = report(made)
    assert got["n"] == 5 and got["accuracy_without"] == 0.6 and got["accuracy_with"] == 0.6 and got["gain"] == 0
    assert got["non_degradation_rate"] == 0.8 and got["mean_teaching_tokens"] == 34
    assert got["outcomes"] == {"improve": 1, "degrade": 1, "same-correct": 2, "same-wrong": 1}
    weak = got["per_band"]["weak"]
    assert weak["n"] == 2 and weak["gain"] == 0 and weak["non_degradation_rate"] == 0.5
    assert weak["mean_reward"] == pytest.approx((1 - 0.2 * 0.5 - 2 - 0.2 * 0.25) / 2)
    assert got["per_band"]["partial"]["accuracy_with"] == pytest.approx(2 / 3)
    assert got["per_band"]["strong"] == {"n": 0, "correct_without": 0, "correct_with": 0, "accuracy_without": None,
                                         "accuracy_with": None, "gain": None, "non_degradation_rate": None,
                                         "mean_teaching_tokens": None, "mean_reward": None,
                                         "outcomes": dict.fromkeys(("improve", "degrade", "same-correct",
                                                                    "same-wrong"), 0)}
    assert report([])["n"] == 0 and report([])["accuracy_with"] is None


# --- bad input: one line, the right exit code, nothing written ----------------------------------

BAD = [
    ("missing-data", ["--data", "{tmp}/nope.jsonl"], 2, "--data {tmp}/nope.jsonl: no such file"),
    ("data-folder", ["--data", "{tmp}/folder"], 2, "--data {tmp}/folder: a folder"),
    ("no-data", [], 2, "--data"),
    ("no-answer", ["--data", "{tmp}/no-answer.jsonl"], 1, "line 1: \"answer\""),
    ("no-question", ["--data", "{tmp}/no-question.jsonl"], 1, "line 1: \"question\" is missing"),
    ("bad-json", ["--data", "{tmp}/bad-json.jsonl"], 1, "bad-json.jsonl line 2: not valid JSON"),
    ("empty", ["--data", "{tmp}/empty.jsonl"], 1, "empty.jsonl: no questions"),
    ("checker", ["--data", "{tmp}/good.jsonl", "--checker", "regex"], 2, "--checker"),
    ("limit-zero", ["--data", "{tmp}/good.jsonl", "--limit", "0"], 2, "--limit"),
    ("probe-zero", ["--data", "{tmp}/good.jsonl", "--probe-tokens", "0"], 2, "--probe-tokens"),
    ("teaching-zero", ["--data", "{tmp}/good.jsonl", "--teaching-tokens", "0"], 2, "--teaching-tokens"),
    ("output-folder", ["--data", "{tmp}/good.jsonl", "-o", "{tmp}/folder"], 2, "-o {tmp}/folder"),
    ("output-is-data", ["--data", "{tmp}/good.jsonl", "-o", "{tmp}/good.jsonl"], 2, "that is the --data file"),
    ("stray-argument", ["--data", "{tmp}/good.jsonl", "extra"], 2, "'extra'"),
    ("bands-crossed", ["--data", "{tmp}/good.jsonl", "weak_below=0.8", "strong_above=0.5"], 1, "strong_above"),
    ("override-checker", ["--data", "{tmp}/good.jsonl", "checker=regex"], 1, "checker=regex"),
    ("teacher-backend", ["--data", "{tmp}/good.jsonl", "--teacher-backend", "nope"], 2, "--teacher-backend"),
    ("teacher-url-auto", ["--data", "{tmp}/good.jsonl", "--teacher-base-url", "http://127.0.0.1:1/v1"], 2,
     "--teacher-base-url"),
    ("config-unknown", ["--data", "{tmp}/good.jsonl", "--config", "{tmp}/unknown.yaml"], 1, "'probe_token' is not known"),
]


def bad_files(tmp: Path) -> None:
    (tmp / "folder").mkdir()
    good = json.dumps({"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n"
    files = {"good.jsonl": good, "bad-json.jsonl": good + '{"question": \n',
             "no-answer.jsonl": '{"question": "What is 2 plus 3?"}\n', "no-question.jsonl": '{"answer": "#### 5"}\n',
             "empty.jsonl": "\n", "unknown.yaml": "probe_token: 3\n"}
    for name, text in files.items():
        (tmp / name).write_text(text)


@pytest.mark.parametrize("case, args, code, named", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_and_writes_nothing(case, args, code, named, tmp_path, monkeypatch, capsys):
    bad_files(tmp_path)
    monkeypatch.setenv("LOCALFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run" / "report.json"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "-o" not in args:
        args += ["-o", str(out)]
    got, _, err = cli_main(monkeypatch, capsys, "teach", "eval", *args)
    assert_one_line(got, err, code, named.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "run").exists()
    assert not rows_path(tmp_path / "folder").exists() and not sidecar(rows_path(out), "progress").exists()
