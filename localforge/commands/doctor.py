"""`localforge doctor`: the hardware profile and what can run on it, as data and as a table."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from localforge.commands import common
from localforge.commands.common import out


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show this machine's hardware and which backends can run on it."""
    data = report()
    if as_json:
        out(json.dumps(data, indent=2))
    else:
        render(data)


def report() -> dict[str, Any]:
    """The machine and every registered engine: installed or why not, where it runs, what it trains,
    and what ``auto`` picks here for generation and for training."""
    from localforge.backends import REGISTRY, availability, choose
    from localforge.backends.server import answering_local_servers
    from localforge.errors import LocalforgeError
    from localforge.hardware import HardwareProfile, default_threads

    profile = HardwareProfile.detect()
    servers = answering_local_servers()
    backends = {}
    for name, spec in REGISTRY.items():
        ok, reason = availability(name)
        if ok and spec.server:
            reason = "client installed; a local server answers" if name in servers else reason
        if ok and spec.caveats.get(profile.os):
            reason = f"{reason}; {spec.caveats[profile.os]}"
        missing = _methods_missing(spec)
        backends[name] = {"available": ok, "reason": reason, "runs_on": spec.runs_on, "extra": spec.extra,
                          "trains": [m for m in spec.methods if m not in missing], "multi_process": spec.multi_process,
                          "loads_adapters": spec.adapters, "methods_missing": missing,
                          "kernels": _kernel_sets(spec), "compiles_on": list(spec.compiles)}
    available = {n: b["available"] for n, b in backends.items()}
    recommended = trainer = None
    try:
        recommended = choose(profile, available, servers)[0]
    except LocalforgeError as exc:
        profile.notes.append(str(exc))
    try:
        trainer = choose(profile, available, train="lora")[0]
    except LocalforgeError as exc:
        profile.notes.append(str(exc))
    data = profile.model_dump()
    accelerators = [
        {k: a[k] for k in ("kind", "name", "memory_bytes", "compute_capability", "bf16")}
        for a in data.pop("accelerators")
    ]
    return {
        **{k: data[k] for k in ("os", "arch", "chip", "cpu_cores", "cpu_bf16", "memory_bytes", "available_memory_bytes")},
        "accelerators": accelerators,
        "apple_silicon": data["apple_silicon"],
        "unified_memory": data["unified_memory"],
        "mlx_device": data["mlx_device"],
        "mps": data["mps"],
        "threads": default_threads(),
        "backends": backends,
        "recommended_backend": recommended,
        "recommended_trainer": trainer,
        "notes": data["notes"],
    }


def _methods_missing(spec) -> dict[str, str]:
    """Methods the engine trains only with a package this machine lacks: method -> what to install."""
    from importlib.util import find_spec

    out = {}
    for method, needs in spec.method_requires.items():
        lacking = [n for n in needs if find_spec(n) is None]
        if lacking:
            dist = dict(zip(needs, spec.method_packages.get(method, ()), strict=False)).get(lacking[0], lacking[0])
            out[method] = f"needs {dist}: pip install 'localforge[{spec.extra}]' (Python >= 3.11)"
    return out


def _kernel_sets(spec) -> dict[str, str]:
    """The kernel sets a config may ask the engine for (``kernels: NAME``): name -> ready, or what to install."""
    from importlib.util import find_spec

    return {name: (f"ready ({', '.join(ks.devices)})" if find_spec(ks.requires) is not None else
                   f"needs {ks.package}: {ks.install} ({', '.join(ks.devices)})")
            for name, ks in spec.kernels.items()}


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def render(data: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = common.console()
    hw = Table(title="Hardware", show_header=False)
    hw.add_row("os / arch", f"{data['os']} / {data['arch']}")
    hw.add_row("chip", data["chip"])
    hw.add_row("cpu cores", f"{data['cpu_cores']} ({data['threads']} engine threads), bf16 instructions: "
                            f"{'yes (torch trains bf16 autocast)' if data['cpu_bf16'] else 'no'}")
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
    for column in ("backend", "available", "runs on", "trains", "detail"):
        be.add_column(column)
    for name, b in data["backends"].items():
        mark = "[green]yes[/]" if b["available"] else "[red]no[/]"
        trains = ", ".join(b["trains"]) + (" (several processes)" if b["multi_process"] else "") if b["trains"] else "-"
        trains += "".join(f"; not {m}: {why}" for m, why in b.get("methods_missing", {}).items())
        trains += "".join(f"; kernels {k}: {state}" for k, state in b.get("kernels", {}).items())
        be.add_row(name, mark, escape(b["runs_on"]), escape(trains), escape(b["reason"]))
    console.print(be)
    console.print(f"recommended backend: [bold]{data['recommended_backend'] or 'none'}[/]")
    console.print(f"recommended for training: [bold]{data['recommended_trainer'] or 'none'}[/]")
    for note in data["notes"]:
        console.print(f"[dim]note: {escape(note)}[/]")
