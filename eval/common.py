"""Helpers shared by the eval scripts: loading a model from a checkpoint or a config, the
output directory, JSON / PNG writing, tables and progress bars.

The table / plot / JSON helpers are generic (plain rows of dicts, plain series of numbers), so
any benchmark script can use them. Model-related helpers import JAX and the model lazily.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, NoReturn, Optional, Sequence

import numpy as np


# ----------------------------------------------------------------------------- errors, output
class EvalError(SystemExit):
    """A clear, user-facing error: the scripts exit with status 2 and the message, no traceback."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def jax_platforms(backend: str) -> str:
    """JAX_PLATFORMS for a --backend choice: "gpu" names CUDA (JAX's "gpu" alias also tries
    ROCm and fails where no ROCm plugin is installed)."""
    return {"gpu": "cuda"}.get(backend, backend)


def fail(message: str) -> NoReturn:
    """Print `error: message` to stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise EvalError(message)


def add_reuse_flags(ap) -> None:
    """`--fresh` and `--reuse_only`, the options `kept_row` reads, on a sweep's parser."""
    ap.add_argument("--fresh", action="store_true", help="retrain runs that already have results")
    ap.add_argument("--reuse_only", action="store_true",
                    help="train nothing: table and plot from the runs that finished")


def kept_row(cached: Path, key, label: str, *, fresh: bool, reuse_only: bool,
             field: str = "key"):
    """(row, done) for one run of a sweep whose finished runs are kept in `cached`
    (OUT/runs/NAME/result.json, written as {field: key, "row": row}): the kept row when it was
    written with this `key` (the resolved config and anything else that decides the result)
    and not `fresh`; else (None, True) under `reuse_only` (the run is left out), or
    (None, False): train it."""
    if cached.is_file() and not fresh:
        prev = json.loads(cached.read_text())
        if prev.get(field) == key:
            print(f"{label}: reusing {cached}", flush=True)
            return prev["row"], True
    if reuse_only:
        print(f"{label}: no finished run, left out (--reuse_only)", flush=True)
        return None, True
    return None, False


def train_model(cfg, workdir, **kwargs) -> dict:
    """`train.run` for scripts that train several models in a row: when a run is stopped by
    SIGTERM (it has saved a checkpoint), the script stops too (exit 143) instead of going on
    to the next model with this one half-trained; rerunning the script resumes the run."""
    import train

    result = train.run(cfg, str(workdir), **kwargs)
    if result.get("preempted"):
        print(f"stopped by SIGTERM while training {workdir}; rerun the same command to resume",
              file=sys.stderr, flush=True)
        raise SystemExit(143)
    return result


def out_dir(path) -> Path:
    """Create (if needed) and return the output directory."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output directory --out {path}: {e}")
    return p


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist") and callable(x.tolist):  # numpy / jax arrays and scalars
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_json(path, obj) -> Path:
    """Write `obj` (numpy values allowed) as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------- tables
def _fmt(v: Any, floatfmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return str(v)
        return format(float(v), floatfmt)
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None,
                 floatfmt: str = ".4g", headers: Optional[Mapping[str, str]] = None) -> str:
    """A Markdown table (also readable in a terminal) of `rows`, one dict per row."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    headers = headers or {}
    head = [headers.get(c, c) for c in columns]
    body = [[_fmt(r.get(c), floatfmt) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def print_table(rows, columns=None, floatfmt: str = ".4g", headers=None, title: str = "") -> str:
    text = format_table(rows, columns, floatfmt, headers)
    if title:
        print(f"\n{title}")
    print(text, flush=True)
    return text


# ----------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_lines(path, series: Mapping[str, tuple], xlabel: str = "", ylabel: str = "",
               title: str = "", logx: bool = False, logy: bool = False,
               markers: bool = True, ylim: Optional[tuple] = None) -> Path:
    """Line plot of `series`: label -> (xs, ys); None / NaN ys are gaps. Writes a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, (xs, ys) in series.items():
        ys = [np.nan if y is None else y for y in ys]
        ax.plot(xs, ys, marker="o" if markers else None, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_heatmaps(path, maps: Mapping[str, np.ndarray], row_labels: Sequence, col_labels: Sequence,
                  xlabel: str = "", ylabel: str = "", title: str = "",
                  vmin: float = 0.0, vmax: float = 1.0) -> Path:
    """One annotated heatmap per entry of `maps` (name -> [rows, cols] array), side by side."""
    plt = _pyplot()
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(1.2 + 0.75 * len(col_labels) * n + 1.0,
                                            1.2 + 0.45 * len(row_labels)), dpi=120, squeeze=False)
    im = None
    for k, (ax, (name, m)) in enumerate(zip(axes[0], maps.items())):
        m = np.asarray(m, dtype=float)
        im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], fontsize=7)
        ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels], fontsize=7)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"{title}\n{name}" if title and n == 1 else name, fontsize=9)
        ax.set_xlabel(xlabel)
        if k == 0:
            ax.set_ylabel(ylabel)
    if title and n > 1:
        fig.suptitle(title, fontsize=10, y=1.02)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- progress
def progress_bar(iterable: Iterable = None, disable: bool = False, **kwargs):
    """tqdm on stderr; silent when `disable` or when MEMLM_NO_PROGRESS is set (tests)."""
    from tqdm.auto import tqdm
    disable = disable or bool(os.environ.get("MEMLM_NO_PROGRESS"))
    return tqdm(iterable, disable=disable, dynamic_ncols=True, leave=False, **kwargs)


# ----------------------------------------------------------------------------- models
def load_checkpoint(path) -> tuple:
    """(model, variables) from a training workdir or a checkpoint directory, with a clear error
    when the path is missing or holds no checkpoint."""
    p = Path(path)
    if not p.exists():
        fail(f"--checkpoint {path}: no such file or directory")
    from mem_lm.pretrained import load_pretrained
    try:
        return load_pretrained(str(p))
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(f"--checkpoint {path}: cannot load a model from it ({type(e).__name__}: {e})")


def _override(item: str) -> tuple:
    """(dotted key, value) of a `a.b=value` override, the value parsed as a Python literal
    when it is one."""
    import ast
    key, sep, raw = item.partition("=")
    if not sep:
        fail(f"override {item!r} must look like field.path=value")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def load_config_file(path, overrides: Sequence[str] = ()):
    """An ml_collections config from `configs/NAME.py` (its `get_config()`), with `a.b=value`
    overrides applied (values parsed as Python literals when they are)."""
    import importlib.util

    p = Path(path)
    if not p.is_file():
        fail(f"--config {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"_memlm_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: report, don't crash
        fail(f"--config {path}: cannot import it ({type(e).__name__}: {e})")
    if not hasattr(module, "get_config"):
        fail(f"--config {path}: has no get_config()")
    return apply_overrides(module.get_config(), overrides)


def apply_overrides(config, overrides: Sequence[str], flag: str = "override"):
    """`config` (a ConfigDict) with each FIELD=VALUE of `overrides` set in place; a field the
    config does not have is a named error (`flag` names the option in it)."""
    for item in overrides:
        key, value = _override(item)
        node = config
        *parents, leaf = key.split(".")
        try:
            for name in parents:
                node = node[name]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = value
        except (KeyError, TypeError, AttributeError):
            fail(f"{flag} {item!r}: the config has no field {key!r}")
    return config


def resolve_config(config):
    """The trainer's resolved config (vocab_size from the data, derived fields filled), with its
    validation errors (which name the field) turned into a clear exit."""
    from train.config import ConfigError, resolve
    try:
        return resolve(config)
    except ConfigError as e:
        fail(str(e))


def init_model(model_config, seq_len: int = 8, seed: int = 0) -> tuple:
    """(model, variables) with fresh parameters for a ModelConfig."""
    import jax
    import jax.numpy as jnp
    from mem_lm import LanguageModel

    model = LanguageModel(model_config)
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, seq_len), jnp.int32))
    return model, variables


def load_model(checkpoint=None, config=None, overrides: Sequence[str] = ()) -> tuple:
    """(model, variables, source, training_config): from --checkpoint, or an untrained model from
    --config. `source` says which (for the JSON output); `training_config` is the run's config
    as a plain dict ({} when a checkpoint has none)."""
    if checkpoint is not None and config is not None:
        fail("give either --checkpoint or --config, not both")
    if checkpoint is not None:
        model, variables = load_checkpoint(checkpoint)
        model = with_model_overrides(model, variables, overrides)
        source = {"checkpoint": str(checkpoint), **({"overrides": list(overrides)}
                                                    if overrides else {})}
        return model, variables, source, training_config(checkpoint) or {}
    if config is not None:
        cfg = resolve_config(load_config_file(config, overrides))
        from train.config import model_config_from as from_resolved
        model, variables = init_model(from_resolved(cfg))
        print(f"note: --config {config} gives an untrained model (random parameters)",
              file=sys.stderr)
        return model, variables, {"config": str(config), "trained": False}, cfg.to_dict()
    fail("give --checkpoint PATH (a training workdir) or --config configs/NAME.py")


def with_model_overrides(model, variables, overrides: Sequence[str] = ()):
    """The model rebuilt from its ModelConfig with `model.FIELD=VALUE` overrides (e.g.
    `model.mixers.attn.topk_blocks=8`), for the same variables: a switch on a trained model.
    Training is over, so any other override, or one that changes a parameter's shape, is an
    error."""
    if not overrides:
        return model
    import jax
    import jax.numpy as jnp
    from flax.core import meta
    from mem_lm import LanguageModel, ModelConfig

    d = model_config_of(model).to_dict()
    for item in overrides:
        key, value = _override(item)
        head, *path = key.split(".")
        if head != "model" or not path:
            fail(f"override {item!r}: a checkpoint takes only model.FIELD=VALUE overrides "
                 f"(its training is over)")
        node = d
        for name in path[:-1]:
            node = node.setdefault(name, {}) if node is d["mixers"] else node.get(name)
            if not isinstance(node, dict):
                fail(f"override {item!r}: the model config has no field {key[6:]!r}")
        node[path[-1]] = value
    try:
        cfg = ModelConfig.from_dict(d)
    except ValueError as e:
        fail(f"override {' '.join(overrides)}: {e}")
    rebuilt = LanguageModel(cfg)
    shapes = meta.unbox(jax.eval_shape(
        lambda: rebuilt.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))))["params"]
    shape_of = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape) for p, x
                             in jax.tree_util.tree_leaves_with_path(tree)}
    old, new = shape_of(meta.unbox(variables["params"])), shape_of(shapes)
    if old != new:
        diff = sorted(set(old.items()) ^ set(new.items()))[0][0]
        fail(f"override {' '.join(overrides)} changes the model's parameters (first: {diff}); "
             f"a checkpoint takes only overrides that keep every parameter's shape")
    return rebuilt


def model_config_of(model):
    """The ModelConfig a LanguageModel was built with."""
    for name in ("config", "cfg"):
        if hasattr(model, name):
            return getattr(model, name)
    fail("cannot find the model's config (expected `model.config`)")


def model_vocab_size(model) -> int:
    return int(model_config_of(model).vocab_size)


def param_count(variables) -> int:
    import jax
    params = variables.get("params", variables) if hasattr(variables, "get") else variables
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def batched_apply(model, variables, inputs: np.ndarray, batch_size: int, progress: bool = False,
                  desc: str = "eval", segment_ids: Optional[np.ndarray] = None):
    """Yield `(start, logits)` for `inputs` [N, T] in batches, as numpy float32; with
    `segment_ids` [N, T] the rows are packed documents (the model's `segment_ids`).

    One jitted function and one compiled shape per T: the last batch is padded with zeros and
    its padding rows dropped.
    """
    import jax

    apply = _jitted_apply(model, packed=segment_ids is not None)
    n = len(inputs)
    for s in progress_bar(range(0, n, batch_size), disable=not progress, desc=desc):
        rows = [inputs[s:s + batch_size]]
        if segment_ids is not None:
            rows.append(segment_ids[s:s + batch_size])
        m = len(rows[0])
        if m < batch_size and n > batch_size:
            rows = [np.concatenate([r, np.zeros((batch_size - m,) + r.shape[1:], r.dtype)])
                    for r in rows]
        logits = apply(variables, *map(jax.numpy.asarray, rows))
        yield s, np.asarray(logits[:m], dtype=np.float32)


_APPLY_CACHE: dict = {}


def _jitted_apply(model, packed: bool = False):
    import jax
    key = (id(model), packed)
    if key not in _APPLY_CACHE or _APPLY_CACHE[key][0] is not model:
        fn = ((lambda v, x, seg: model.apply(v, x, segment_ids=seg)) if packed
              else (lambda v, x: model.apply(v, x)))
        _APPLY_CACHE[key] = (model, jax.jit(fn))
    return _APPLY_CACHE[key][1]


def label_hits(logits: np.ndarray, labels: np.ndarray, ignore_index: int = -100):
    """(hits [B, T] bool, mask [B, T] bool): greedy prediction equals the label, where labelled."""
    mask = labels != ignore_index
    return (logits.argmax(-1) == labels) & mask, mask


def training_config(path) -> Optional[dict]:
    """The resolved training config (`config.json`) of a workdir or of a checkpoint inside one,
    as a plain dict; None when there is none."""
    p = Path(path).resolve()
    for d in (p, *list(p.parents)[:3]):
        f = d / "config.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (OSError, ValueError):
                return None
    return None


def mixer_names() -> tuple:
    from mem_lm import token_mixers
    return token_mixers()
