"""What a run leaves for people: ``manifest.json`` and ``loss.png``.

The manifest says what ran where (hardware, package versions, seed, the full config, the data
files' hashes, the plan) and how it went (status, steps, final losses, tokens/s, peak memory).
``metrics.jsonl`` holds one line per step and per evaluation; the PNG is drawn from it.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from localforge.files import write_atomic


def versions(packages: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Python's version, localforge's, and each of ``packages`` (an engine spec's list)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("localforge", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far. On Linux the high-water mark of its own
    memory map (``VmHWM``): ``ru_maxrss`` keeps the peak of the process it was started from
    across fork and exec, so a run started by a large process (a test session, a pipeline holding
    a teacher) would report that process's memory as its own."""
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_metrics(rows: list[dict]) -> dict:
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    out: dict = {}
    if train:
        out["final_train_loss"] = train[-1]["loss"]
        out["steps"] = train[-1]["step"]
    if evals:
        out["final_eval_loss"] = evals[-1]["eval_loss"]
    scored = [r for r in train if "reward" in r]
    if scored:
        out["final_reward"] = scored[-1]["reward"]
        tail = scored[-max(1, len(scored) // 10):]
        out["mean_reward_last_10pct"] = round(sum(r["reward"] for r in tail) / len(tail), 6)
        out["mean_reward_first_10pct"] = round(sum(r["reward"] for r in scored[:len(tail)]) / len(tail), 6)
    return out


def plot_loss(rows: list[dict], out: Path, title: str, rewards: bool = False) -> Path | None:
    """Train loss per step (and its running mean) with eval loss points; None without matplotlib.
    ``rewards`` (a GRPO run): a second panel with the reward's mean per step, its spread within
    the step's groups as a band, and each reward's mean."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if rewards:
        fig, (ax, rax) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=110, sharex=True)
        _plot_rewards(rax, [r for r in rows if "reward" in r])
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, loss = [r["step"] for r in train], [r["loss"] for r in train]
        k = len(loss) // 20
        ax.plot(steps, loss, color="#9ecae1" if k > 1 else "#3182bd", lw=1 if k > 1 else 2, label="train loss")
        if k > 1:  # a running mean once there are enough steps for one to help
            smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
            ax.plot(steps, smooth, color="#3182bd", lw=2, label=f"train loss (mean of {k})")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="#e6550d",
                label="eval loss")
    ax.set_xlabel("" if rewards else "step")
    ax.set_ylabel("GRPO loss" if rewards else "loss (nats per token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _plot_rewards(ax, rows: list[dict]) -> None:
    if rows:
        steps = [r["step"] for r in rows]
        mean = [r["reward"] for r in rows]
        std = [r.get("reward_std", 0.0) for r in rows]
        ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)],
                        color="#a1d99b", alpha=0.5, label="reward spread (std)")
        ax.plot(steps, mean, color="#31a354", lw=2, label="reward (mean)")
        names = sorted({k for r in rows for k in r if k.startswith("reward/")})
        if len(names) > 1:
            for name in names:
                ax.plot(steps, [r.get(name) for r in rows], lw=1, ls="--", label=name.split("/", 1)[1])
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
