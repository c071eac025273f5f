"""Where a jitted program's time goes, from a `jax.profiler` trace: Pallas kernels, matmuls,
library attention, collectives, other XLA work, idle.

    with jax.profiler.trace(log_dir):
        ...  # run the compiled program a few times
    summary = summarize(log_dir, compiled.as_text(), steps=3)

The trace is read from the `*.xplane.pb` that every jax writes (`jax.profiler.ProfileData`,
shipped with jaxlib: no tensorboard plugin needed, nothing fetched). Device work is the events
of the device planes (GPU: the CUDA streams' kernels, named per HLO instruction by their
`hlo_op` stat; TPU: the "XLA Ops" line), or on a CPU the host threads' events that carry an
`hlo_op` stat (XLA's thunks). Each event is classified by its HLO instruction in the compiled
program's text (`compiled.as_text()`):

    pallas      custom calls of Pallas kernels (Triton, Mosaic GPU, Mosaic TPU)
    matmul      dot / convolution instructions, fusions that contain one, cuBLAS custom calls
    attention   cuDNN custom calls and fusions (the library attention kernels)
    collective  all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all, ...
    other       every other fusion, copy, memset, and events of other programs
    idle        the part of the window (first event's start to last event's end) where no
                device work runs

Events the program text does not name fall back on their kernel name (the Pallas kernels'
names in the custom calls' backend configs: pallas; gemm / cutlass / xmma: matmul; nccl:
collective; cudnn / fmha: attention). Control-flow thunks (while, conditional,
call) enclose their bodies' events and are left out. Where events overlap (several streams or
CPU threads), each instant is split evenly among the events running then, so the rows sum to
the window.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Optional

CATEGORIES = ("pallas", "matmul", "attention", "collective", "other", "idle")
_PALLAS = re.compile(r"triton|mosaic|tpu_custom_call")
_LIBRARY_MATMUL = re.compile(r"cublas|gemm|matmul")
_ATTENTION = re.compile(r"cudnn|fmha")
_COLLECTIVE = re.compile(r"^(all-reduce|all-gather|reduce-scatter|collective-permute|"
                         r"all-to-all|collective-broadcast|send|recv|ragged-all-to-all)")
_CONTROL = ("while", "conditional", "call")
# first match wins: a fusion holding a collective and a dot is a collective, ...
_PRIORITY = ("pallas", "attention", "collective", "matmul", "other")

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?<![\w$.\-])([a-z][a-z0-9\-]*)\(")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_KERNEL_NAME = re.compile(r'\bname\\?"?\s*[:=]\s*\\?"([^"\\]+)')
# lines of a device plane that profilers derive from the kernels (not kernels themselves)
_DERIVED = ("XLA Modules", "XLA Ops", "Steps", "XLA TraceMe", "Framework Ops",
            "Framework Name Scope", "Source code", "Launch Stats")


def _own_category(opcode: str, rest: str) -> Optional[str]:
    """The category an instruction has by itself (None: decided by what it calls, or none)."""
    if opcode == "custom-call":
        target = (_TARGET.search(rest) or [None, ""])[1].lower()
        for name, pattern in (("pallas", _PALLAS), ("attention", _ATTENTION),
                              ("matmul", _LIBRARY_MATMUL)):
            if pattern.search(target):
                return name
        return "other"
    if opcode in ("dot", "convolution", "ragged-dot"):
        return "matmul"
    if _COLLECTIVE.match(opcode):
        return "collective"
    if opcode in ("fusion", "async-start", "async-update", "async-done") + _CONTROL:
        return None
    return "other"


def hlo_categories(hlo_text: str) -> tuple:
    """(module name, {instruction name: category or None for control flow}, {Pallas kernel
    name: "pallas"}) of a compiled program's HLO text."""
    module = re.search(r"^HloModule\s+([\w.\-]+)", hlo_text, re.M)
    comps, current = {}, None       # computation -> [(name, opcode, own category, called)]
    kernels = {}                    # the names Pallas kernels are launched under
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = comps.setdefault(m.group(1), [])
            continue
        m = _INSTRUCTION.match(line)
        if m is None or current is None:
            continue
        name, rest = m.groups()
        op = _OPCODE.search(rest)
        opcode = op.group(1) if op else ""
        called = _CALLS.search(rest)
        own = _own_category(opcode, rest)
        current.append((name, opcode, own, called.group(1) if called else None))
        if own == "pallas":
            kernels.update(dict.fromkeys(_KERNEL_NAME.findall(rest), "pallas"))
        if opcode == "fusion" and _ATTENTION.search(rest.lower()):
            current[-1] = (name, opcode, "attention", None)     # cuDNN fusions

    memo = {}

    def comp_category(comp: str, depth: int = 0) -> str:
        if comp not in memo:
            found = {instr_category(i, depth + 1) for i in comps.get(comp, ())}
            memo[comp] = next((c for c in _PRIORITY if c in found), "other")
        return memo[comp]

    def instr_category(instr: tuple, depth: int = 0) -> Optional[str]:
        _, opcode, own, called = instr
        if own is not None:
            return own
        if opcode in _CONTROL:
            return None
        return comp_category(called, depth) if called and depth < 20 else "other"

    table = {}
    for instrs in comps.values():
        for instr in instrs:
            table[instr[0]] = instr_category(instr)
    return (module.group(1) if module else None), table, kernels


def _name_category(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        return "collective"
    if _ATTENTION.search(low):
        return "attention"
    if re.search(r"gemm|cutlass|xmma|cublas|sm\d+_.*(h|b)mma", low):
        return "matmul"
    return "other"


def device_events(profile) -> list:
    """[(start ns, end ns, name, stats)] of the device work in a `jax.profiler.ProfileData`."""
    planes = [p for p in profile.planes if p.name.startswith("/device:")]
    events = []
    for plane in planes:
        lines = list(plane.lines)
        ops = [ln for ln in lines if ln.name == "XLA Ops"]                     # TPU
        streams = (ops or [ln for ln in lines if ln.name.startswith("Stream")]   # GPU
                   or [ln for ln in lines if ln.name not in _DERIVED])
        for line in streams:
            for e in line.events:
                stats = dict(e.stats)
                if ops:
                    stats.setdefault("hlo_op", e.name)
                events.append((e.start_ns, e.start_ns + e.duration_ns, e.name, stats))
    if events:
        return events
    for plane in profile.planes:       # CPU: XLA's thunks on the host threads
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                if "hlo_op" in stats and e.duration_ns > 0:
                    events.append((e.start_ns, e.start_ns + e.duration_ns, e.name, stats))
    return events


def split_time(intervals: list) -> dict:
    """{category: ns} from [(start, end, category)], each instant split evenly among the
    intervals covering it; 'idle' is the uncovered part between the first start and last end."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    if not intervals:
        return out
    edges = sorted({t for s, e, _ in intervals for t in (s, e)})
    bounds = sorted((s, e, c) for s, e, c in intervals)
    active, nxt = [], 0
    for a, b in zip(edges, edges[1:]):
        while nxt < len(bounds) and bounds[nxt][0] <= a:
            active.append(bounds[nxt])
            nxt += 1
        active = [iv for iv in active if iv[1] > a]
        if not active:
            out["idle"] += b - a
            continue
        for _, _, c in active:
            out[c] += (b - a) / len(active)
    return out


def summarize(log_dir: str, hlo_text: str, steps: int) -> dict:
    """The table of where the traced steps' time went: {"rows": [{category, ms_per_step,
    percent}], "window_ms", "events", "unnamed_events", "trace"}."""
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {log_dir}")
    events = device_events(ProfileData.from_file(paths[-1]))
    module, table, kernels = hlo_categories(hlo_text)
    intervals, unnamed = [], 0
    for start, end, name, stats in events:
        op, mod = stats.get("hlo_op"), stats.get("hlo_module")
        if op is not None and (mod is None or module is None or str(mod) == module):
            if str(op) in table:
                category = table[str(op)]
                if category is None:        # control flow: its body's events are counted
                    continue
            else:
                unnamed += 1
                category = kernels.get(name) or _name_category(name)
        elif op is not None:                # another program's work
            category = "other"
        else:
            unnamed += 1
            category = kernels.get(name) or _name_category(name)
        intervals.append((start, end, category))
    ns = split_time(intervals)
    window = sum(ns.values())
    rows = [{"category": c, "ms_per_step": ns[c] / 1e6 / steps,
             "percent": 100 * ns[c] / window if window else None} for c in CATEGORIES]
    return {"rows": rows, "window_ms": window / 1e6, "steps": steps, "events": len(intervals),
            "unnamed_events": unnamed, "module": module, "trace": paths[-1]}
