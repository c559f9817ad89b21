"""Whole runs: the run folder, exact resume (after Ctrl-C too), two processes, and bad input.

Most runs use the tiny random Llama (milliseconds a step); one short run per engine uses the
bundled SmolLM2-135M.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localforge.errors import ConfigError
from localforge.finetune.run import RunDir, TrainingInterrupted, start, train
from tests.helpers import MODEL, run_cli

CONFIG = """model: {model}
data: data/
method: lora
lora: {{rank: 4, alpha: 8, dropout: 0.1, targets: [q_proj, v_proj, gate_proj]}}
steps: {steps}
batch_size: 2
grad_accum: 2
learning_rate: 1.0e-2
max_seq_length: 128
seed: 3
eval_every: 3
save_every: 3
output_dir: runs/a
"""


@pytest.fixture
def project(tmp_path, train_data, tiny_llama, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(CONFIG.format(model=tiny_llama, steps=8))
    return tmp_path


def losses(run_dir, key="loss") -> dict[int, float]:
    """Step -> loss (or eval loss) from a run's metrics.jsonl."""
    return {r["step"]: r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if key in r}


def test_a_run_leaves_adapter_checkpoints_manifest_and_loss_curve(project):
    run, _ = start(project / "config.yaml", ["backend=torch"])
    manifest = train(run.path)
    assert manifest["status"] == "completed"
    m = manifest["metrics"]
    assert m["steps"] == 8 and m["final_train_loss"] == losses(run.path)[8]
    assert list(losses(run.path, "eval_loss")) == [3, 6, 8] and m["final_eval_loss"] == losses(run.path, "eval_loss")[8]
    assert m["peak_rss_bytes"] > 100e6 and m["tokens_per_second"] > 0
    for key in ("hardware", "versions", "seed", "config", "data_files", "plan"):
        assert manifest[key], key
    assert manifest["data_files"]["train"]["sha256"] and manifest["versions"]["torch"]
    assert manifest["plan"]["batch_size"] == 2 and manifest["config"]["lora"]["rank"] == 4
    assert (run.adapter / "adapter_model.safetensors").exists() and manifest["adapter"]["format"] == "peft"
    assert [p.name for p in run.checkpoint_dirs()] == ["step-00000006", "step-00000008"]  # keep_checkpoints: 2
    assert (project / "runs/a/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="already holds a run: continue it with `localforge finetune resume"):
        start(project / "config.yaml", ["backend=torch"])
    with pytest.raises(ConfigError, match="MLX trains in one process here"):
        start(project / "config.yaml", ["backend=mlx", "num_processes=2", "output_dir=runs/mlx2"])


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_stopped_and_resumed_run_follows_the_uninterrupted_curve(project, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    straight, _ = start(project / "config.yaml", [f"backend={backend}", "output_dir=runs/straight"])
    train(straight.path)
    run, _ = start(project / "config.yaml", [f"backend={backend}", "output_dir=runs/split"])
    with pytest.raises(TrainingInterrupted, match=r"stopped at step 4 of 8; checkpoint saved in .*step-00000004"):
        train(run.path, stop_after=4)
    assert json.loads(run.manifest.read_text())["status"] == "interrupted"
    manifest = train(run.path)
    assert manifest["resumed_from"].endswith("step-00000004")
    assert losses(run.path) == pytest.approx(losses(straight.path), rel=1e-6)
    assert losses(run.path, "eval_loss") == pytest.approx(losses(straight.path, "eval_loss"), rel=1e-6)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_same_run(project, tiny_llama):
    (project / "config.yaml").write_text(CONFIG.format(model=tiny_llama, steps=40).replace("save_every: 3",
                                                                                         "save_every: 100"))
    proc = subprocess.Popen([sys.executable, "-m", "localforge", "finetune", "config.yaml", "--backend", "torch",
                             "--no-progress"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LOCALFORGE_THREADS": "1"})
    metrics = project / "runs/a/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: stopped at step ")
    assert "continue with `localforge finetune resume" in err and "Traceback" not in err
    run = RunDir(project / "runs/a")
    stopped_at = len(losses(run.path))
    assert 3 <= stopped_at < 40 and run.latest().name == f"step-{stopped_at:08d}"

    done = run_cli("finetune", "resume", str(run.path), "--no-progress", env={"LOCALFORGE_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr and done.stdout.strip() == str(run.adapter)
    straight, _ = start(project / "config.yaml", ["backend=torch", "output_dir=runs/straight"])
    train(straight.path)
    assert losses(run.path) == pytest.approx(losses(straight.path), rel=1e-6)


def test_two_processes_match_one(project):
    # without dropout: each process draws its own dropout masks, so only the maths can match; in
    # fp32, since the processes' evaluation batches are narrower and bf16 rounds them otherwise
    one, _ = start(project / "config.yaml", ["backend=torch", "output_dir=runs/one", "batch_size=4", "steps=4",
                                             "lora.dropout=0", "dtype=fp32"])
    train(one.path)
    result = run_cli("finetune", "config.yaml", "--backend", "torch", "--num-processes", "2", "batch_size=2",
                     "output_dir=runs/two", "steps=4", "lora.dropout=0", "dtype=fp32", "--no-progress")
    assert result.returncode == 0, result.stderr
    two = RunDir("runs/two")
    assert json.loads(two.manifest.read_text())["processes"] == 2
    assert losses(two.path) == pytest.approx(losses(one.path), rel=1e-5)
    assert losses(two.path, "eval_loss") == pytest.approx(losses(one.path, "eval_loss"), rel=1e-5)
    from safetensors.numpy import load_file

    a, b = load_file(one.adapter / "adapter_model.safetensors"), load_file(two.adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]).max() < 1e-5 for k in a)


def test_bad_input_is_one_line(project):
    (project / "data/train.jsonl").write_text('{"text": "fine"}\n{"prompt": "x"}\n')
    bad = run_cli("finetune", "config.yaml")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "train.jsonl line 2: 'prompt' and 'completion' must both be strings" in bad.stderr
    missing = run_cli("finetune", "resume", "nowhere")
    assert missing.returncode == 1 and "nowhere is not a localforge run folder" in missing.stderr


def test_resume_refuses_changed_data(project):
    run, _ = start(project / "config.yaml", ["backend=torch", "steps=2"])
    train(run.path)
    with open(project / "data/train.jsonl", "a") as fh:
        fh.write('{"text": "one more row"}\n')
    result = run_cli("finetune", "resume", str(run.path), "steps=4")
    assert result.returncode == 1
    assert "train data) changed or is gone since the run began" in result.stderr


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_short_real_run_on_the_bundled_model(project, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    result = run_cli("finetune", "config.yaml", "--backend", backend, f"model={MODEL}", "steps=2", "batch_size=1",
                     "grad_accum=1", "max_seq_length=64", "eval_every=2", "output_dir=runs/real", "--no-progress")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((project / "runs/real/manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["total_params"] > 130e6
    assert 0 < manifest["metrics"]["final_train_loss"] < 8  # a trained model, not a random one (10.8)
    assert manifest["adapter"]["format"] == {"torch": "peft", "mlx": "mlx"}[backend]
    memory = manifest["metrics"]["memory"]  # what the process held, beside the planner's prediction
    assert memory["predicted_peak_bytes"] == manifest["plan"]["predicted_peak_bytes"]
    assert memory["host_peak_rss_bytes"] == manifest["metrics"]["peak_rss_bytes"] and memory["device"] == "cpu"
    if backend == "torch":  # one small batch: the peak is loading the weights, which the planner counts
        assert 0.7 < memory["host_peak_rss_bytes"] / memory["predicted_peak_bytes"] < 1.3, memory
    else:
        assert memory["peak_allocated_bytes"] > 100e6  # MLX's own count: the weights at least


@pytest.mark.parametrize("trained_on, used_on", [("mlx", "torch"), ("torch", "mlx")])
def test_an_adapter_trained_on_one_engine_gives_the_same_logits_on_the_other(project, tiny_llama, trained_on, used_on):
    pytest.importorskip("mlx.core")
    from localforge.adapters import convert
    from tests.test_adapters import max_diff, mlx_logits, mlx_model, torch_logits

    run, _ = start(project / "config.yaml", [f"backend={trained_on}", "steps=3", "learning_rate=0.05",
                                             "lora.dropout=0", "lora.layers=1"])
    adapter = Path(train(run.path)["adapter"]["path"])
    other = convert(adapter, {"torch": "peft", "mlx": "mlx"}[used_on], project / "converted")
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173]
    native, moved = (adapter, other) if trained_on == "torch" else (other, adapter)
    on_torch, on_mlx = torch_logits(tiny_llama, ids, native), mlx_logits(mlx_model(tiny_llama, moved), ids)
    assert max_diff(on_torch, on_mlx) < 1e-4
    assert max_diff(on_torch, torch_logits(tiny_llama, ids)) > 1e-3  # the adapter did move the logits


def test_the_peak_memory_is_the_runs_own_not_the_process_that_started_it():
    """A run started from a large process (a test session, a pipeline holding its teacher) reports
    its own peak: on Linux ``ru_maxrss`` carries the parent's across fork and exec, VmHWM does not."""
    import subprocess
    import sys

    held = bytearray(768 * 2**20)
    held[::4096] = b"\x01" * len(held[::4096])  # touch every page: the parent holds 768 MiB
    child = subprocess.run([sys.executable, "-c", "from localforge.finetune.report import peak_rss_bytes; "
                            "print(peak_rss_bytes())"], capture_output=True, text=True, check=True)
    assert int(child.stdout) < 400 * 2**20 < len(held), child.stdout
