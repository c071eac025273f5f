"""Run a test file as a script in a process of its own that sees N simulated CPU devices
(XLA_FLAGS must be set before JAX starts, so not in the pytest process)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_with_devices(script: str, out: Path, devices: int = 8, timeout: int = 900) -> None:
    """`python script out` with `devices` CPU devices; AssertionError with its stderr tail
    when it fails. The timeout is for a loaded 2-core machine."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO)) if p)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    proc = subprocess.run([sys.executable, script, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
