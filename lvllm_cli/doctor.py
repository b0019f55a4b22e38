"""`lvllm doctor`: what this machine is and what to fix, as Rich tables or `--json`; exit 1 when a check FAILs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from lvllm_runtime import checks as checks_mod
from lvllm_runtime.topology import Topology, format_cpulist, probe

from .output import emit_json, stderr, stdout

GiB = 1 << 30
STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red"}


def doctor(
    json_out: Annotated[
        bool, typer.Option("--json", help="Print {topology, checks, bench, status} as JSON on stdout.")
    ] = False,
    bench: Annotated[
        bool, typer.Option("--bench", help="Measure memory read bandwidth per NUMA node (a few seconds).")
    ] = False,
    model: Annotated[
        Optional[Path],
        typer.Option("--model", metavar="DIR", help="Also check that this model folder's experts fit in free RAM."),
    ] = None,
    plan: Annotated[
        Optional[Path],
        typer.Option("--plan", metavar="FILE", help="Also check that each node this plan uses has its share free."),
    ] = None,
    sysfs: Annotated[Path, typer.Option(hidden=True, help="Read another sysfs tree (GPUs not probed).")] = Path("/sys"),
    procfs: Annotated[Path, typer.Option(hidden=True, help="Read another procfs tree.")] = Path("/proc"),
) -> None:
    """Show NUMA nodes, cores, ISA, RAM, GPUs and versions, then PASS/WARN/FAIL checks with a fix for each."""
    live = sysfs == Path("/sys")
    topo = probe(sysfs, procfs, gpus=live)
    from lvllm_runtime.plan import load_plan

    results = checks_mod.run_checks(topo, model, load_plan(plan) if plan else None)
    measured = None
    if bench:
        from lvllm_runtime.membench import bench_topology

        stderr.print(f"measuring memory read bandwidth on {len(topo.nodes)} node(s)...")
        measured = bench_topology(topo)
    failed = checks_mod.worst(results) is checks_mod.Status.FAIL
    if json_out:
        emit_json(
            {
                "topology": topo.to_dict(),
                "checks": [c.to_dict() for c in results],
                "bench": measured,
                "status": checks_mod.worst(results).value,
            }
        )
    else:
        _render(topo, results, measured)
    if failed:
        raise typer.Exit(1)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f} GiB"


def _render(topo: Topology, results: list[checks_mod.Check], measured: dict[str, Any] | None) -> None:
    machine = Table(title="Machine", show_header=False, title_justify="left")
    machine.add_row("CPU", topo.cpu_model)
    machine.add_row("ISA has", " ".join(k for k, v in topo.isa.items() if v) or "-")
    machine.add_row("ISA lacks", " ".join(k for k, v in topo.isa.items() if not v) or "-")
    machine.add_row("Engine kernels", checks_mod.kernel_isa(topo))
    machine.add_row("L3 (per instance)", _gib(topo.l3_bytes) if topo.l3_bytes and topo.l3_bytes >= GiB else
                    ("-" if topo.l3_bytes is None else f"{topo.l3_bytes >> 20} MiB"))
    machine.add_row("RAM", f"{_gib(topo.ram_total)} total, {_gib(topo.ram_available)} available")
    machine.add_row("Transparent hugepages", topo.thp)
    machine.add_row("kernel.numa_balancing", "-" if topo.numa_balancing is None else str(topo.numa_balancing))
    stdout.print(machine)

    virtual = " (virtual: LVLLM_VIRTUAL_NUMA)" if topo.virtual_numa else ""
    nodes = Table(title=f"NUMA nodes: {len(topo.nodes)}{virtual}", title_justify="left")
    for col in ("node", "cpus", "cores", "threads/core", "memory", "free"):
        nodes.add_column(col, justify="left" if col == "cpus" else "right")
    for n in topo.nodes:
        e = len(n.efficiency_cores)
        cores = f"{len(n.cores) - e}P + {e}E" if e else str(len(n.cores))
        nodes.add_row(str(n.id), format_cpulist(n.cpus), cores, str(n.smt_threads), _gib(n.mem_total),
                      _gib(n.mem_free))
    for m in topo.memory_nodes:
        nodes.add_row(str(m.id), "[dim]none (memory only)[/]", "0", "-", _gib(m.mem_total), _gib(m.mem_free))
    stdout.print(nodes)

    if topo.gpus:
        gpus = Table(title="GPUs", title_justify="left")
        for col in ("#", "name", "VRAM", "free", "compute", "PCIe", "NUMA node"):
            gpus.add_column(col)
        for g in topo.gpus:
            pcie = f"gen{g.pcie_gen} x{g.pcie_width}" if g.pcie_gen and g.pcie_width else "-"
            gpus.add_row(str(g.index), g.name, _gib(g.vram_total), _gib(g.vram_free), g.compute_capability or "-",
                         pcie, "-" if g.numa_node is None else str(g.numa_node))
        stdout.print(gpus)
    else:
        stdout.print(f"[bold]GPUs:[/] none ({escape(topo.gpu_note or '')})", highlight=False)

    versions = Table(title="Versions", show_header=False, title_justify="left")
    for k, v in topo.versions.items():
        versions.add_row(k, v or "[dim]none[/]")
    stdout.print(versions)

    if measured:
        bw = Table(title=f"Memory read bandwidth ({measured['unit']})", title_justify="left")
        for col in ("node", "threads", "cpus", "GB/s", "median GB/s", "buffer", "via"):
            bw.add_column(col, justify="left" if col == "cpus" else "right")
        rows = measured["nodes"] + ([measured["all_nodes"]] if measured["all_nodes"] else [])
        for b in rows:
            bw.add_row("all" if b["node"] is None else str(b["node"]), str(b["threads"]), format_cpulist(b["cpus"]),
                       f"{b['gb_s']:.1f}", f"{b['gb_s_median']:.1f}", f"{b['bytes'] >> 20} MiB", b["backend"])
        stdout.print(bw)

    # Lines, not a table: a fix is often a command to copy, and table cells would wrap or cut it.
    stdout.print("[bold]Checks[/]")
    for c in results:
        s = c.status.value
        stdout.print(f"  [{STYLE[s]}]{s}[/] {c.name}: {escape(c.message)}", highlight=False, soft_wrap=True)
        if c.fix:
            stdout.print(f"       fix: {escape(c.fix)}", highlight=False, soft_wrap=True)
    worst = checks_mod.worst(results).value
    counts = ", ".join(f"{sum(c.status.value == s for c in results)} {s}" for s in ("PASS", "WARN", "FAIL"))
    stdout.print(f"[{STYLE[worst]}]{worst}[/]: {counts}")
