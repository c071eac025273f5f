"""Helpers for the trainer tests (a plain module: `conftest` is a name every test folder shares): subprocess runs of `python -m train` on configs/tiny.py.

Runs that must start JAX with special flags (8 fake CPU devices, jax.distributed) are
subprocesses. All of them share one persistent compilation cache, so identical programs
(the uninterrupted / killed / resumed runs) compile once.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.py")


def subprocess_env(cache_dir: str | None = None, devices: int | None = None) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO)) if p)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def train_cmd(workdir, *overrides: str, config: str = TINY) -> list[str]:
    return [sys.executable, "-m", "train", "--config", config, "--workdir", str(workdir),
            *[f"--config.{o}" for o in overrides]]


def start(cmd, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    proc.wait(timeout=timeout)
    out = log.read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
    return out


def train_losses(workdir) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last row of a step wins: a resumed run rewrites)."""
    out = {}
    with open(Path(workdir) / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = row["loss"]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
