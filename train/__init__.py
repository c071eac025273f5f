"""Config-driven, sharded, resumable training: `python -m train --config configs/NAME.py --workdir DIR`.

Library entry point: `train.run(config, workdir) -> dict` of final metrics (see train/loop.py).
"""
from train.config import ConfigError, resolve, validate


def run(config, workdir, **kwargs):
    """Train (or resume) in `workdir`; return the final metrics. See `train.loop.run`."""
    from train.loop import run as _run
    return _run(config, workdir, **kwargs)


__all__ = ["run", "validate", "resolve", "ConfigError"]
