"""`localforge doctor`: the hardware profile and what can run on it, as data and as a table."""

from __future__ import annotations

from typing import Any


def report() -> dict[str, Any]:
    from localforge.backends import REGISTRY, availability, choose_auto
    from localforge.backends.server import answering_local_servers
    from localforge.errors import LocalforgeError
    from localforge.hardware import HardwareProfile, default_threads

    profile = HardwareProfile.detect()
    servers = answering_local_servers()
    backends = {}
    for name in REGISTRY:
        ok, reason = availability(name)
        if ok and REGISTRY[name].server:
            reason = "client installed; a local server answers" if name in servers else reason
        backends[name] = {"available": ok, "reason": reason, "runs_on": REGISTRY[name].runs_on}
    try:
        recommended = choose_auto(profile, {n: b["available"] for n, b in backends.items()}, servers)
    except LocalforgeError as exc:
        recommended = None
        profile.notes.append(str(exc))
    data = profile.model_dump()
    accelerators = [
        {k: a[k] for k in ("kind", "name", "memory_bytes", "compute_capability", "bf16")}
        for a in data.pop("accelerators")
    ]
    return {
        **{k: data[k] for k in ("os", "arch", "chip", "cpu_cores", "memory_bytes", "available_memory_bytes")},
        "accelerators": accelerators,
        "apple_silicon": data["apple_silicon"],
        "unified_memory": data["unified_memory"],
        "mlx_device": data["mlx_device"],
        "mps": data["mps"],
        "threads": default_threads(),
        "backends": backends,
        "recommended_backend": recommended,
        "notes": data["notes"],
    }


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def render(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    hw = Table(title="Hardware", show_header=False)
    hw.add_row("os / arch", f"{data['os']} / {data['arch']}")
    hw.add_row("chip", data["chip"])
    hw.add_row("cpu cores", f"{data['cpu_cores']} ({data['threads']} engine threads)")
    hw.add_row("memory", f"{_gib(data['memory_bytes'])} ({_gib(data['available_memory_bytes'])} free)")
    for a in data["accelerators"]:
        extra = f", cc {a['compute_capability']}, bf16={'yes' if a['bf16'] else 'no'}" if a["kind"] == "cuda" else ""
        hw.add_row(f"accelerator ({a['kind']})", f"{a['name']}, {_gib(a['memory_bytes'])}{extra}")
    if not data["accelerators"]:
        hw.add_row("accelerator", "none (CPU only)")
    hw.add_row("mlx device", data["mlx_device"] or "-")
    hw.add_row("torch mps", "yes" if data["mps"] else "no")
    console.print(hw)

    be = Table(title="Backends")
    be.add_column("backend")
    be.add_column("available")
    be.add_column("runs on")
    be.add_column("detail")
    for name, b in data["backends"].items():
        mark = "[green]yes[/]" if b["available"] else "[red]no[/]"
        be.add_row(name, mark, escape(b["runs_on"]), escape(b["reason"]))
    console.print(be)
    console.print(f"recommended backend: [bold]{data['recommended_backend'] or 'none'}[/]")
    for note in data["notes"]:
        console.print(f"[dim]note: {escape(note)}[/]")
