"""python -m train --config configs/NAME.py --workdir DIR [--config.GROUP.FIELD=VALUE ...]

Multi-host: add --coordinator_address HOST:PORT --num_processes N --process_id I (or set
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or --config.distributed.initialize
on a platform JAX auto-detects, e.g. TPU pods, SLURM).
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/NAME.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: config.json, metrics.jsonl, "
                               "tensorboard/, checkpoints/ (a run resumes from here)")
_COORD = flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port")
_NPROC = flags.DEFINE_integer("num_processes", None, "jax.distributed number of processes")
_PID = flags.DEFINE_integer("process_id", None, "jax.distributed id of this process")
_VALIDATE_ONLY = flags.DEFINE_bool("validate_only", False, "check the config, print it, and exit")
flags.mark_flags_as_required(["config"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with each --config.PATH override checked against the schema first:
    an unknown field or a value that does not parse is `error: config.PATH: ...` and exit code
    2, like every ConfigError, where ml_collections would end in a traceback."""
    from train.config import ConfigError, check_override

    try:
        for arg in argv[1:]:
            m = re.match(r"-{1,2}(?:no)?config\.([^=]+)", arg)
            if m:
                check_override(m[1])
        return flags.FLAGS(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
    except ValueError as e:   # ml_collections: a field under one the config file leaves None
        m = re.match(r'Override (\S+) can not be applied because field "(\w+)" is None', str(e))
        if m is None:
            raise
        parts = m[1].split(".")
        parent = ".".join(parts[:parts.index(m[2]) + 1]) if m[2] in parts else m[2]
        print(f"error: config.{m[1]}: config.{parent} is None in this config file; a config "
              f"file sets it to a dict (as configs/rmt_small.py sets model.segments), whose "
              f"fields the command line can then override", file=sys.stderr)
    except flags.Error as e:
        m = re.match(r"flag --config\.([^=]+)=(.*?): (.*)", str(e), re.S)
        if m is None:  # not an override: absl's own report
            print(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help "
                  f"on flags.", file=sys.stderr)
            sys.exit(1)
        print(f"error: config.{m[1]}: cannot set it to {m[2]!r}: {m[3]}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    del argv
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO
    from ml_collections import ConfigDict

    from train.config import ConfigError, resolve, to_json

    config = ConfigDict(_CONFIG.value.to_dict())
    if _COORD.value:
        config.distributed.coordinator_address = _COORD.value
    if _NPROC.value is not None:
        config.distributed.num_processes = _NPROC.value
    if _PID.value is not None:
        config.distributed.process_id = _PID.value
    try:
        if _VALIDATE_ONLY.value:
            import jax
            print(to_json(resolve(config, num_devices=jax.device_count())))
            return 0
        if not _WORKDIR.value:
            raise app.UsageError("--workdir is required")
        from train.loop import NonFiniteError, ResumeError, run
        result = run(config, _WORKDIR.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ResumeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    import jax
    if jax.process_index() == 0:
        print_summary(result)
    return 0


def print_summary(r: dict) -> None:
    lines = ["", "=" * 72]
    status = "stopped by SIGTERM (checkpoint saved; rerun to resume)" if r.get("preempted") else "done"
    lines.append(f"{status}: step {r['step']}, {r['num_params']:,} parameters")
    if r.get("loss") is not None:
        lines.append(f"  train loss           {r['loss']:.4f}")
    if "eval_loss" in r:
        lines.append(f"  validation loss      {r['eval_loss']:.4f}  (perplexity {r['eval_perplexity']:.2f}, "
                     f"next-token accuracy {r['eval_accuracy']:.3f})")
    if r.get("tokens_per_second"):
        mfu = f", MFU ~{100 * r['mfu']:.2f}%" if r.get("mfu") else ""
        lines.append(f"  throughput           {r['tokens_per_second']:,.0f} tokens/s{mfu}")
    if r.get("nonfinite_total"):
        lines.append(f"  skipped updates      {r['nonfinite_total']} (non-finite loss or gradient)")
    if r.get("sample") is not None:
        lines.append("  sample:")
        lines.append("-" * 72)
        lines.append(r["sample"])
        lines.append("-" * 72)
    lines.append(f"  metrics              {r['metrics_file']}")
    if r.get("tensorboard_dir"):
        lines.append(f"  TensorBoard          tensorboard --logdir {r['tensorboard_dir']}")
    if r.get("checkpoint_dir"):
        rel = os.path.relpath(r["workdir"])
        lines.append(f"  checkpoints          {r['checkpoint_dir']}  "
                     f"(mem_lm.load_pretrained({rel if not rel.startswith('..') else r['workdir']!r}))")
    lines.append(f"  config               {os.path.join(r['workdir'], 'config.json')}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
