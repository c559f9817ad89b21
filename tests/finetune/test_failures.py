"""Fine-tuning when things go wrong, and full fine-tunes: resume for `method: full`, a full run's
output is a model that `--model` loads, the manifest records every way a session ends, and a
corrupt checkpoint is one line naming the file."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from localforge.errors import ConfigError, LocalforgeError
from localforge.finetune.run import RunDir, TrainingInterrupted, start, train
from tests.finetune.test_run import CONFIG, losses
from tests.helpers import run_cli


@pytest.fixture
def project(tmp_path, train_data, tiny_llama, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(CONFIG.format(model=tiny_llama, steps=6))
    return tmp_path


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_full_fine_tune_resumes_on_the_uninterrupted_curve(project, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    full = ["method=full", f"backend={backend}", "learning_rate=1e-3"]
    straight, _ = start(project / "config.yaml", [*full, "output_dir=runs/straight"])
    train(straight.path)
    run, _ = start(project / "config.yaml", [*full, "output_dir=runs/split"])
    with pytest.raises(TrainingInterrupted, match="stopped at step 3 of 6"):
        train(run.path, stop_after=3)
    stopped = json.loads(run.manifest.read_text())
    assert stopped["status"] == "interrupted" and stopped["reason"].startswith("stopped at step 3 of 6")
    manifest = train(run.path)
    assert manifest["status"] == "completed" and manifest["resumed_from"].endswith("step-00000003")
    assert losses(run.path) == pytest.approx(losses(straight.path), rel=1e-6)
    assert losses(run.path, "eval_loss") == pytest.approx(losses(straight.path, "eval_loss"), rel=1e-6)
    # a full run's output is a model folder, not an adapter
    assert manifest["adapter"] is None and manifest["output"]["kind"] == "model"
    assert manifest["output"]["path"] == str(run.model) and (run.model / "config.json").exists()
    assert (run.model / "tokenizer.json").exists() and not run.adapter.exists()


def test_a_full_run_s_model_answers_through_generate_model(project):
    result = run_cli("finetune", "config.yaml", "--backend", "torch", "method=full", "steps=2", "--no-progress")
    assert result.returncode == 0, result.stderr
    model = project / "runs/a/model"
    assert result.stdout.strip() == str(model)
    assert f"model (hf): {model}" in result.stderr and "adapter" not in result.stderr
    answer = run_cli("generate", "Say hi", "--model", str(model), "--backend", "torch", "--max-tokens", "4",
                     "--verbose")
    assert answer.returncode == 0, answer.stderr
    assert "[torch model] prompt=" in answer.stderr and "completion=4" in answer.stderr


def test_a_checkpoint_that_cannot_be_written_fails_the_manifest_in_one_line(project):
    run, _ = start(project / "config.yaml", ["backend=torch"])
    run.checkpoints.write_text("a file where the checkpoints folder goes")  # a real write failure
    with pytest.raises(LocalforgeError, match=r"could not write checkpoint .*step-00000003") as info:
        train(run.path)
    assert "\n" not in str(info.value)
    manifest = json.loads(run.manifest.read_text())
    assert manifest["status"] == "failed" and manifest["reason"] == str(info.value)
    assert list(losses(run.path)) == [1, 2, 3]  # the steps before it are kept


def test_a_session_that_fails_records_failed_with_the_reason(project, monkeypatch):
    run, _ = start(project / "config.yaml", ["backend=torch"])
    (project / "data/train.jsonl").write_text('{"prompt": "' + "word " * 300 + '", "completion": " x"}\n')
    with pytest.raises(ConfigError, match="nothing left to learn") as info:
        train(run.path)
    manifest = json.loads(run.manifest.read_text())
    assert (manifest["status"], manifest["reason"]) == ("failed", str(info.value))


# -- corrupt checkpoints ----------------------------------------------------------------------------

def _random(path):
    path.write_bytes(os.urandom(max(64, path.stat().st_size // 2)))


def _empty(path):
    path.write_bytes(b"")


def _truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {"random bytes": _random, "empty": _empty, "truncated": _truncated}
FILES = ["trainer_state.json", "engine/adapter_model.safetensors", "engine/optimizer.pt", "engine/rng-0.pt"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_llama):
    """A torch run stopped at step 3 (checkpoint step-3), to copy and damage."""
    from tests.helpers import TRAIN_ROWS, VALID_ROWS, write_jsonl

    root = tmp_path_factory.mktemp("stopped")
    (root / "data").mkdir()
    write_jsonl(root / "data/train.jsonl", TRAIN_ROWS)
    write_jsonl(root / "data/valid.jsonl", VALID_ROWS)
    (root / "config.yaml").write_text(CONFIG.format(model=tiny_llama, steps=6))
    run, _ = start(root / "config.yaml", ["backend=torch", f"output_dir={root / 'run'}"])
    with pytest.raises(TrainingInterrupted):
        train(run.path, stop_after=3)
    return run.path


def _damaged_copy(stopped_run, tmp_path, file: str, damage) -> tuple[RunDir, str]:
    copy = tmp_path / "run"
    shutil.copytree(stopped_run, copy)
    run = RunDir(copy)
    target = run.latest() / file
    damage(target)
    return run, str(target)


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
@pytest.mark.parametrize("file", FILES)
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(stopped_run, tmp_path, file, damage):
    run, target = _damaged_copy(stopped_run, tmp_path, file, DAMAGE[damage])
    with pytest.raises(ConfigError) as info:
        train(run.path)
    message = str(info.value)
    assert message.startswith(f"corrupt or unreadable: {target}") and "\n" not in message
    assert f"delete {run.latest()}" in message
    manifest = json.loads(run.manifest.read_text())
    assert manifest["status"] == "failed" and manifest["reason"] == message


@pytest.mark.parametrize("content", ["{}", "garbage", "[1, 2]", '{"step": "three"}', '{"step": 0}', ""])
def test_a_bad_trainer_state_is_one_line(stopped_run, tmp_path, content):
    run, target = _damaged_copy(stopped_run, tmp_path, "trainer_state.json", lambda p: p.write_text(content))
    with pytest.raises(ConfigError) as info:
        train(run.path)
    assert str(info.value).startswith(f"corrupt or unreadable: {target}") and "\n" not in str(info.value)


@pytest.mark.parametrize("file, damage", [("trainer_state.json", lambda p: p.write_text("{}")),
                                          ("engine/adapter_model.safetensors", _truncated)], ids=["state", "engine"])
def test_finetune_resume_says_it_in_one_line(stopped_run, tmp_path, file, damage):
    run, target = _damaged_copy(stopped_run, tmp_path, file, damage)
    result = run_cli("finetune", "resume", str(run.path), "--no-progress")
    assert result.returncode == 1 and result.stderr.count("error: ") == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: corrupt or unreadable: {target}")
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr


def test_deleting_the_damaged_checkpoint_as_told_resumes_from_the_one_before(stopped_run, tmp_path):
    run, _ = _damaged_copy(stopped_run, tmp_path, "engine/optimizer.pt", _empty)
    with pytest.raises(ConfigError, match="delete .*step-00000003 to train this run again from the start"):
        train(run.path)
    shutil.rmtree(run.latest())
    assert train(run.path)["status"] == "completed"


@pytest.mark.parametrize("backend, file", [("torch", "engine/model.safetensors"), ("torch", "engine/optimizer.pt"),
                                           ("mlx", "engine/adapters.safetensors"),
                                           ("mlx", "engine/optimizer.safetensors")])
def test_a_corrupt_full_or_mlx_checkpoint_is_one_line(project, backend, file):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    method = "full" if backend == "torch" else "lora"
    run, _ = start(project / "config.yaml", [f"backend={backend}", f"method={method}", "steps=4"])
    with pytest.raises(TrainingInterrupted):
        train(run.path, stop_after=3)
    target = run.latest() / file
    _truncated(target)
    with pytest.raises(ConfigError) as info:
        train(run.path)
    assert str(info.value).startswith(f"corrupt or unreadable: {target}") and "\n" not in str(info.value)
    assert json.loads(run.manifest.read_text())["status"] == "failed"
