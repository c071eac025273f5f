"""The training loop: `run(config, workdir) -> dict of final metrics`.

State is a plain dict {step, params, opt_state, rng, nonfinite_total, nonfinite_streak}; the
train step is `jax.jit` with in/out shardings from the params' logical axis names and the
config's rules, and donates the state.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from mem_lm import apply_with_aux
from train import data as data_lib
from train.checkpoint import Checkpointer
from train.config import logical_axis_rules, model_config_from, resolve, to_json
from train.metrics import MetricsWriter, peak_flops_per_device, train_flops_per_token
from train.optim import learning_rate_schedule, make_optimizer
from train.sharding import batch_sharding, logical_to_shardings, make_mesh

CONFIG_FILE = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"


class NonFiniteError(RuntimeError):
    """Raised after `train.max_consecutive_nonfinite` skipped updates in a row."""


class ResumeError(RuntimeError):
    """The workdir has checkpoints, but none fits the config's model and optimizer."""


def maybe_initialize_distributed(config) -> None:
    """`jax.distributed.initialize` when the config, flags or environment ask for it."""
    d = config.distributed
    addr = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    n = d.num_processes if d.num_processes > 0 else int(os.environ.get("JAX_NUM_PROCESSES", -1))
    pid = d.process_id if d.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
    if not (d.initialize or addr):
        return
    from jax._src import distributed as _dist
    if getattr(_dist.global_state, "client", None) is not None:
        return  # already initialized
    kwargs = {}
    if addr:
        kwargs["coordinator_address"] = addr
    if n > 0:
        kwargs["num_processes"] = n
    if pid >= 0:
        kwargs["process_id"] = pid
    jax.distributed.initialize(**kwargs)


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)


def progress_line(step: int, steps: int, metrics: dict, seconds_per_step: float | None) -> str:
    """The plain progress line logged in place of the bar when stderr is not a terminal."""
    parts = [f"step {step}/{steps}", f"loss {metrics['loss']:.4f}"]
    if metrics.get("tokens_per_second"):
        parts.append(f"{metrics['tokens_per_second']:,.0f} tok/s")
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    if seconds_per_step:
        eta = int(round(seconds_per_step * (steps - step)))
        parts.append(f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
    return ", ".join(parts)


def _model_with_dtype(model_cfg, compute_dtype: str):
    """(model config, cast_params): the model computes in `compute_dtype` through its own
    `dtype` field when it has one; otherwise the step casts the float32 params itself."""
    if compute_dtype == "float32":
        return model_cfg, False
    if hasattr(model_cfg, "dtype"):
        return dataclasses.replace(model_cfg, dtype=compute_dtype), False
    return model_cfg, True


def num_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def save_config(config: ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(to_json(config))


class Trainer:
    """Builds the model, mesh, shardings, jitted steps and data for a resolved config."""

    def __init__(self, config: ConfigDict, workdir: str):
        from mem_lm import LanguageModel

        self.config, self.workdir = config, workdir
        t = config.train
        self.model_cfg = model_config_from(config)
        model_cfg, self.cast_params = _model_with_dtype(self.model_cfg, t.compute_dtype)
        self.model = LanguageModel(model_cfg)
        self.tx = make_optimizer(config.optim)
        self.schedule = learning_rate_schedule(config.optim)
        self.mesh = make_mesh((config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                               config.mesh.context))
        self.rules = logical_axis_rules(config)
        self.batch_sharding = batch_sharding(config, self.mesh)
        self.packed = config.data.source not in data_lib.SYNTHETIC
        self.compute_dtype = jnp.bfloat16 if t.compute_dtype == "bfloat16" else jnp.float32

        with self.context():
            boxed = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
            self.state_shardings = logical_to_shardings(boxed, self.mesh, config)
        abstract = nn.meta.unbox(boxed)
        self.abstract_state = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings)
        self.num_params = num_params(abstract["params"])
        self.flops_per_token = train_flops_per_token(self.num_params, self.model_cfg, t.seq_len)

        self._init = jax.jit(lambda rng: nn.meta.unbox(self._init_boxed(rng)),
                             out_shardings=self.state_shardings)
        self._train_step = jax.jit(self._step, in_shardings=(self.state_shardings, self.batch_sharding),
                                   out_shardings=(self.state_shardings, None), donate_argnums=(0,))
        self._eval_step = jax.jit(self._eval, in_shardings=(self.state_shardings["params"], self.batch_sharding))

    def context(self):
        """Logical axis rules and the mesh, active while tracing: activation constraints need both."""
        import contextlib
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    # -- pure functions (traced) -------------------------------------------------------------
    def _init_boxed(self, rng):
        init_rng, state_rng = jax.random.split(rng)
        tokens = jnp.zeros((1, self.config.train.seq_len), jnp.int32)
        params = self.model.init(init_rng, tokens)["params"]
        return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                    rng=state_rng, nonfinite_total=jnp.zeros((), jnp.int32),
                    nonfinite_streak=jnp.zeros((), jnp.int32))

    def _forward(self, params, batch):
        if self.cast_params:
            params = jax.tree_util.tree_map(
                lambda p: p.astype(self.compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        seg = batch["segment_ids"] if self.packed else None
        logits, aux = apply_with_aux(self.model, {"params": params}, batch["inputs"], seg)
        logits = logits.astype(jnp.float32)
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        w = batch["weights"]
        correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
        # The objective is a sum over target tokens that _step divides by their count; adding
        # each auxiliary loss times that count makes the mean objective xent + Σ aux losses.
        wsum, xent_sum = w.sum(), (xent * w).sum()
        objective = xent_sum + wsum * sum(aux["losses"].values(), jnp.zeros(()))
        logged = {f"aux/{k}": v for group in aux.values() for k, v in group.items()}
        return objective, (wsum, (correct * w).sum(), xent_sum, logged)

    def _step(self, state, batch):
        accum = self.config.train.grad_accum_steps
        grad_fn = jax.value_and_grad(self._forward, has_aux=True)
        if accum == 1:
            (_, (wsum, _, xent_sum, aux)), grads = grad_fn(state["params"], batch)
        else:
            # Micro-batch m takes rows m, m+accum, ...: every device holds part of every micro-batch.
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, mb):
                (_, (w, _, x, a)), g = grad_fn(state["params"], mb)
                a = jax.tree_util.tree_map(lambda v: v / accum, a)   # the mean over micro-batches
                return jax.tree_util.tree_map(jnp.add, carry, (x, w, g, a)), None

            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            aux_shapes = jax.eval_shape(self._forward, state["params"], first)[1][3]
            zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                           (jnp.zeros(()), jnp.zeros(()), state["params"], aux_shapes))
            (xent_sum, wsum, grads, aux), _ = jax.lax.scan(body, zeros, micro)
        denom = jnp.maximum(wsum, 1.0)
        loss = xent_sum / denom     # the language-model loss; the gradient also has the aux losses
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = self.tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
        bad = (~ok).astype(jnp.int32)
        new_state = dict(step=state["step"] + 1, params=keep(new_params, state["params"]),
                         opt_state=keep(new_opt, state["opt_state"]),
                         rng=jax.random.fold_in(state["rng"], state["step"]),
                         nonfinite_total=state["nonfinite_total"] + bad,
                         nonfinite_streak=(state["nonfinite_streak"] + bad) * bad)
        metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=self.schedule(state["step"]),
                       target_tokens=wsum, nonfinite=bad, nonfinite_streak=new_state["nonfinite_streak"],
                       nonfinite_total=new_state["nonfinite_total"], **aux)
        return new_state, metrics

    def _eval(self, params, batch):
        _, (wsum, correct, loss_sum, _) = self._forward(params, batch)
        return dict(loss_sum=loss_sum, weight=wsum, correct=correct)

    # -- host side ---------------------------------------------------------------------------
    def global_batch(self, local: dict) -> dict:
        """This process's rows (whole sequences) as global arrays. The global shape is given:
        a process holds its rows' every token even where T is split over devices (mesh.context
        > 1), so only the batch dimension is split by process."""
        pc = jax.process_count()
        return {k: jax.make_array_from_process_local_data(
                    self.batch_sharding, np.asarray(v), (np.shape(v)[0] * pc,) + np.shape(v)[1:])
                for k, v in local.items()}

    def load_params(self, path: str):
        """The parameters of the checkpoint at `path` (resolve checked that they fit the
        model), placed as the train state's are."""
        from mem_lm.pretrained import load_pretrained
        _, variables = load_pretrained(path)
        return jax.device_put(variables["params"], self.state_shardings["params"])

    def init_state(self, seed: int):
        with self.context():
            return self._init(jax.random.PRNGKey(seed))

    def train_step(self, state, local_batch):
        with self.context():
            return self._train_step(state, self.global_batch(local_batch))

    def evaluate(self, params, batches) -> dict:
        tot = dict(loss_sum=0.0, weight=0.0, correct=0.0)
        with self.context():
            outs = [self._eval_step(params, self.global_batch(b)) for b in batches]
        for o in jax.device_get(outs):
            for k in tot:
                tot[k] += float(o[k])
        loss = tot["loss_sum"] / max(tot["weight"], 1.0)
        return dict(eval_loss=loss, eval_perplexity=math.exp(min(loss, 80.0)),
                    eval_accuracy=tot["correct"] / max(tot["weight"], 1.0))


def _run_meta(config: ConfigDict, trainer: "Trainer") -> dict:
    return dict(config=config.to_dict(), model_config=trainer.model_cfg.to_dict(),
                num_params=trainer.num_params)


def run(config: ConfigDict, workdir: str, *, progress: bool | None = None,
        return_state: bool = False) -> dict:
    """Train (or resume) the run in `workdir`; return its final metrics.

    The returned dict has step, loss, eval_loss, eval_perplexity, eval_accuracy,
    tokens_per_second, mfu, nonfinite_total, preempted, num_params, workdir, checkpoint_dir,
    tensorboard_dir, metrics_file, (if `config.sample.enabled`) sample, and (if
    `return_state`) state: the final train state (params, opt_state, ...) as sharded arrays.
    """
    maybe_initialize_distributed(config)
    pc, pi = jax.process_count(), jax.process_index()
    config = resolve(config, num_devices=jax.device_count(), process_count=pc)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    save_config(config, workdir)
    t = config.train

    trainer = Trainer(config, workdir)
    ckpt_dir = config.checkpoint.dir or os.path.join(workdir, CHECKPOINT_SUBDIR)
    ckpt = Checkpointer(ckpt_dir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save) \
        if config.checkpoint.enabled else None

    restored = ckpt.restore_latest(trainer.abstract_state) if ckpt else None
    if ckpt and not restored and ckpt.steps():
        ckpt.close()
        raise ResumeError(f"none of the checkpoints {ckpt.steps()} in {ckpt_dir} can be restored "
                           f"into this config's model and optimizer (see the warnings above; did the "
                           f"config change?). Use a new --workdir, or remove them to start over.")
    if restored:
        state, data_state, start = restored
        _log(f"resumed from {ckpt_dir} at step {start}")
    else:
        state, data_state, start = trainer.init_state(t.seed), None, 0
        if t.init_from:
            state["params"] = trainer.load_params(t.init_from)
            _log(f"parameters from {t.init_from}")
    train_source = data_lib.make_source(config, "train")
    it = data_lib.make_train_iterator(config, pi, pc, state=data_state, source=train_source)
    eval_data = data_lib.eval_batches(config, pi, pc) if t.eval_batches else []
    meta = _run_meta(config, trainer)

    writer = MetricsWriter(workdir, jsonl=config.logging.jsonl, tensorboard=config.logging.tensorboard)
    mesh_shape = dict(zip(trainer.mesh.axis_names, trainer.mesh.devices.shape))
    _log(f"model: {trainer.num_params:,} params, pattern={getattr(trainer.model_cfg, 'pattern', None)}; "
         f"mesh {mesh_shape} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
         f"{pc} process(es); data: {config.data.source}; workdir: {workdir}")

    stop = {"sigterm": False}
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        def on_sigterm(signum, frame):
            stop["sigterm"] = True
        old_handler = signal.signal(signal.SIGTERM, on_sigterm)

    from tqdm import tqdm
    show_progress = (config.logging.progress_bar if progress is None else progress) and pi == 0
    # A pod's log file is not a terminal: a bar's carriage returns become one endless line
    # there, so it gets a plain line every `log_every` steps instead.
    plain_lines = show_progress and not sys.stderr.isatty()
    bar = tqdm(total=t.steps, initial=start, disable=not show_progress or plain_lines,
               dynamic_ncols=True, unit="step", file=sys.stderr, mininterval=0.5)
    peak = peak_flops_per_device(config) * trainer.mesh.devices.size
    tokens_per_step = t.batch_size * t.seq_len
    last = dict(step=start, loss=float("nan"))
    pending: list = []          # (step, device metrics) not yet read back
    window = dict(loss=0.0, n=0, t0=None, steps=0)
    final_eval: dict = {}
    last_saved = start if restored else -1
    preempted = False

    def process_pending():
        nonlocal pending
        for s, m in pending:
            m = jax.device_get(m)
            loss = float(m["loss"])
            last.update(step=s, loss=loss, grad_norm=float(m["grad_norm"]),
                        learning_rate=float(m["learning_rate"]), nonfinite_total=int(m["nonfinite_total"]),
                        aux={k: float(v) for k, v in m.items() if k.startswith("aux/")})
            if math.isfinite(loss):
                window["loss"] += loss
                window["n"] += 1
            window["steps"] += 1
            if s % t.log_every == 0 or s == t.steps or s == start + 1:
                now = time.time()
                # The first step after (re)start includes compilation: no throughput for it.
                dt = now - window["t0"] if window["t0"] is not None else 0.0
                tps = tokens_per_step * window["steps"] / dt if dt > 0 else None
                out = dict(loss=window["loss"] / window["n"] if window["n"] else loss,
                           learning_rate=last["learning_rate"], grad_norm=last["grad_norm"],
                           tokens_per_second=tps, nonfinite_total=last["nonfinite_total"], **last["aux"])
                if tps:
                    out["mfu"] = tps * trainer.flops_per_token / peak if peak == peak else None
                    last["tokens_per_second"], last["mfu"] = tps, out["mfu"]
                writer.write(s, out)
                bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{tps:,.0f}" if tps else "-",
                                **{k[4:]: f"{v:.4g}" for k, v in last["aux"].items()}, refresh=False)
                if plain_lines:
                    _log(progress_line(s, t.steps, out, dt / window["steps"] if dt > 0 else None))
                window.update(t0=now, steps=0, loss=0.0, n=0)
            last["streak"] = int(m["nonfinite_streak"])
            if last["streak"] >= t.max_consecutive_nonfinite:
                pending = []
                if ckpt:
                    ckpt.wait()
                good = max(ckpt.steps()) if ckpt and ckpt.steps() else None
                raise NonFiniteError(
                    f"stopping at step {s}: {int(m['nonfinite_streak'])} consecutive steps with a "
                    f"non-finite loss or gradient (train.max_consecutive_nonfinite="
                    f"{t.max_consecutive_nonfinite}); those updates were skipped. "
                    + (f"The last good checkpoint is step {good} in {ckpt_dir}." if good is not None
                       else "No checkpoint was written."))
        pending = []

    def save(step, periodic=False):
        nonlocal last_saved
        if periodic and last.get("streak", 0):
            _log(f"step {step}: not checkpointing during a run of non-finite steps")
            return
        if ckpt and last_saved != step:
            ckpt.save(step, state, it.get_state(), meta)
            last_saved = step

    try:
        step = start
        while step < t.steps:
            if stop["sigterm"]:
                preempted = True
                break
            state, m = trainer.train_step(state, next(it))
            step += 1
            bar.update(1)
            # Read the previous step's metrics after dispatching this one (keeps the device busy).
            if pending:
                process_pending()
            pending.append((step, m))
            need_sync = (step % t.log_every == 0 or step == t.steps or step == start + 1
                         or (t.checkpoint_every and step % t.checkpoint_every == 0)
                         or (t.eval_every and step % t.eval_every == 0))
            if need_sync:
                process_pending()
            if eval_data and t.eval_every and step % t.eval_every == 0 and step != t.steps:
                ev = trainer.evaluate(state["params"], eval_data)
                writer.write(step, ev)
                _log(f"step {step}: eval loss {ev['eval_loss']:.4f}, perplexity {ev['eval_perplexity']:.2f}, "
                     f"accuracy {ev['eval_accuracy']:.4f}")
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                save(step, periodic=True)
        process_pending()
        if preempted:
            _log(f"SIGTERM: saving a checkpoint at step {step} and stopping; rerun the same command to resume")
        elif eval_data:
            final_eval = trainer.evaluate(state["params"], eval_data)
            writer.write(step, final_eval)
        save(step)
    finally:
        bar.close()
        if ckpt:
            ckpt.close()
        writer.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    result = dict(step=step, loss=last["loss"], tokens_per_second=last.get("tokens_per_second"),
                  mfu=last.get("mfu"), nonfinite_total=last.get("nonfinite_total", 0),
                  preempted=preempted, num_params=trainer.num_params, workdir=workdir,
                  checkpoint_dir=ckpt_dir if ckpt else None,
                  tensorboard_dir=writer.tb_dir if config.logging.tensorboard else None,
                  metrics_file=os.path.join(workdir, "metrics.jsonl"), **final_eval)
    if config.sample.enabled and not preempted and trainer.packed:
        result["sample"] = sample_text(trainer, state["params"], config)
    if return_state:
        result["state"] = state
    return result


def sample_text(trainer: Trainer, params, config) -> str:
    """A sample from the trained model with `mem_lm.generate` (the prompt included)."""
    from mem_lm import generate

    s = config.sample
    tok = data_lib.make_tokenizer(config.data.tokenizer)
    prompt = jnp.asarray(tok.encode(s.prompt)[None, :], jnp.int32)
    params = jax.device_get(params)
    out = generate(trainer.model, {"params": params}, prompt, max_new_tokens=s.max_new_tokens,
                   rng=jax.random.PRNGKey(config.train.seed), temperature=s.temperature, top_k=s.top_k)
    return tok.decode(np.asarray(out)[0].tolist())
