"""Metrics: DIR/metrics.jsonl, TensorBoard event files (tensorboardX), FLOP and MFU estimates."""
from __future__ import annotations

import json
import math
import os

import jax

# Peak dense bf16 FLOP/s per device, by `device_kind` substring (lower case). Rough, for MFU.
_PEAK_TFLOPS = (
    ("v6", 918.0), ("v5p", 459.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v4", 275.0),
    ("v3", 123.0), ("h200", 989.0), ("h100", 989.0), ("a100", 312.0), ("l4", 121.0),
    ("a10", 125.0), ("v100", 125.0),
)


def peak_flops_per_device(config) -> float:
    if config.logging.peak_tflops > 0:
        return config.logging.peak_tflops * 1e12
    d = jax.devices()[0]
    kind = d.device_kind.lower()
    for key, tf in _PEAK_TFLOPS:
        if key in kind:
            return tf * 1e12
    if d.platform == "cpu":
        # A rough CPU figure: cores x 2.5 GHz x 32 float32 FLOP/cycle (2 AVX2 FMA units).
        return (os.cpu_count() or 1) * 2.5e9 * 32 / max(jax.local_device_count(), 1)
    return float("nan")


def train_flops_per_token(num_params: int, model_cfg, seq_len: int) -> float:
    """6 N per token for the weights, plus the softmax-attention score/value products
    (6 · span · d per layer, causal), span = the keys a query sees (its mechanism's
    `attention_span` in the registry: the window for sliding-window layers)."""
    from layers import registry

    flops = 6.0 * num_params
    for mixer in model_cfg.layer_mixers:
        span = registry.get(mixer).attention_span
        if span is not None:
            flops += 6.0 * span(model_cfg.settings(mixer), seq_len) * model_cfg.d_model
    return flops


class MetricsWriter:
    """Writes on process 0 only; `write(step, metrics)` appends to metrics.jsonl and TensorBoard."""

    def __init__(self, workdir: str, jsonl: bool = True, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = None
        self.tb_dir = os.path.join(workdir, "tensorboard")
        if not self.enabled:
            return
        if jsonl:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(self.tb_dir)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, float) or hasattr(v, "dtype") else v)
                 for k, v in metrics.items()}
        if self._jsonl:
            row = {"step": int(step)}
            row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                        for k, v in clean.items()})
            self._jsonl.write(json.dumps(row) + "\n")
        if self._tb:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))

    def flush(self):
        if self._tb:
            self._tb.flush()

    def close(self):
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
