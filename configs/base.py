"""The base config: every experiment file in configs/ starts from `get_config()` here.

    python -m train --config configs/NAME.py --workdir DIR [--config.GROUP.FIELD=VALUE ...]

Groups (the trainer rejects any field that is not listed here, naming it):

  model       the fields of `mem_lm.ModelConfig` (vocab_size -1: taken from the data);
              model.mixers.<name>.<field>: each registered mechanism's settings
  data        where batches come from: the built-in corpus (Python's standard library), text
              files/dirs/globs/JSONL, or a synthetic memory task (mqar, copy, assoc_recall, niah)
  optim       AdamW, warmup + cosine decay, global-norm clipping, weight-decay exclusions
  train       steps, batch_size, seq_len, intervals, seed, dtypes, gradient accumulation
  mesh        device mesh ("data", "fsdp", "tensor", "context"); -1 fills with the remaining
              devices; context > 1 splits every sequence over that many devices (context
              parallelism: layers/common.py `over_context`)
  rules       logical axis name -> mesh axes ("data,fsdp" for two, "" for replicated)
  checkpoint  orbax CheckpointManager options
  logging     progress bar, TensorBoard, metrics.jsonl, MFU peak
  distributed jax.distributed.initialize (multi-host / multi-process)
  sample      the generated sample printed at the end of a run
"""
from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict, config_dict

# Logical axis names used by the model's parameters and activations (DESIGN.md).
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "memory", "expert")
MESH_AXES = ("data", "fsdp", "tensor", "context")
DATA_SOURCES = ("stdlib", "text", "mqar", "copy", "assoc_recall", "niah", "segment_recall")


_OPTIONAL_TYPES = {f"Optional[{t.__name__}]": t for t in (int, float, bool, str)}


def _fill_placeholders(d: dict, types: dict) -> dict:
    """None -> a typed placeholder, so that `--config.model.X=...` works on an unset field.
    A None of no scalar type (`segments`, a settings group or None) stays None: a config file
    sets it to a dict, whose fields the command line can then override."""
    return {k: config_dict.placeholder(types[k]) if v is None and types[k] is not None else v
            for k, v in d.items()}


def mixers_config(overrides: dict | None = None) -> ConfigDict:
    """Every registered mechanism's settings (model.mixers.<name>.<field>) at their defaults,
    `overrides` ({name: {field: value}}) applied on top."""
    from layers import registry

    overrides = dict(overrides or {})
    out = {}
    for slot in registry.SLOTS:
        for name in registry.names(slot):
            mech = registry.get(name)
            settings = mech.resolve(overrides.pop(name, {}))
            out[name] = _fill_placeholders(settings, {k: s.type for k, s in mech.settings.items()})
    if overrides:
        registry.get(sorted(overrides)[0])   # raises, naming the known mechanisms
    return ConfigDict(out)


def every_token_mixer(**settings) -> dict:
    """{name: settings} for every registered token mixer that has all those fields, e.g.
    `short_conv=True`: q/k/v short convs on whichever mixer `pattern` picks."""
    from layers import registry

    return {n: dict(settings) for n in registry.names("token")
            if set(settings) <= set(registry.get(n).settings)}


def model_config(**fields) -> ConfigDict:
    """All `mem_lm.ModelConfig` fields with their defaults, `fields` applied on top; under
    `mixers`, the settings of every registered mechanism.

    Building the group from the dataclass and the registry means every model field and
    mechanism setting can be overridden on the command line, and a new field or mechanism
    appears here without editing this file.
    """
    from mem_lm import ModelConfig

    required = dict(vocab_size=256, d_model=64, num_layers=2, num_heads=2)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config.model: unknown ModelConfig field(s) {unknown}; known: {sorted(known)}")
    vocab = fields.pop("vocab_size", -1)
    mixers = fields.pop("mixers", {})
    d = ModelConfig(**{**required, **fields, "mixers": mixers}).to_dict()
    # Tuples: ml_collections overrides a tuple field from the command line, never a list.
    d["pattern"], d["channel_pattern"] = tuple(d["pattern"]), tuple(d["channel_pattern"])
    d["vocab_size"] = vocab
    d["mixers"] = mixers_config(mixers)
    types = {f.name: _OPTIONAL_TYPES.get(str(f.type)) for f in dataclasses.fields(ModelConfig)}
    if d.get("segments") is not None:
        # bptt None (full backpropagation) as an int placeholder, so that the command line can
        # set it (--config.model.segments.bptt=2); the other settings have values.
        d["segments"] = _fill_placeholders(d["segments"], {k: int for k in d["segments"]})
    return ConfigDict(_fill_placeholders(d, types))


def get_config() -> ConfigDict:
    c = ConfigDict()

    c.model = model_config(d_model=64, num_layers=2, num_heads=2, pattern=("gdn", "swa"))

    c.data = ConfigDict(dict(
        source="stdlib",          # stdlib | text | mqar | copy | assoc_recall | niah |
                                  # segment_recall
        paths="",                 # text: comma-separated files, directories or globs (.txt/.py/.md/.jsonl ...)
        val_paths="",             # text: validation files; "" = split `paths` by file name
        val_fraction=0.02,        # share of files (by a hash of the name) held out for validation
        tokenizer="byte",         # "byte" (256 symbols) or a path to a HF tokenizers tokenizer.json
        text_field="text",        # JSONL: the key holding the document text
        extensions=".py,.txt,.md,.rst,.json,.jsonl",  # file types picked up from directories
        shuffle=True,
        # synthetic tasks (generated from (seed, index), so any batch can be regenerated)
        vocab_size=8192,          # synthetic vocabulary
        num_kv_pairs=16,          # mqar / assoc_recall; niah: needles per sequence;
                                  # segment_recall: facts per segment
        power_a=0.01,             # mqar: query-position distribution
        random_non_queries=True,  # mqar
        copy_length=16,           # copy: tokens to copy
        segment_len=0,            # segment_recall: tokens per segment; 0 = model.segments.length
        distance=0,               # segment_recall: segments from a fact to its question;
                                  # 0 = drawn per segment, uniform in 1 .. max_distance
        max_distance=0,           # segment_recall: largest drawn distance; 0 = segments - 1
        num_workers=0,            # grain: prefetch threads (0 = in the main thread)
    ))

    c.optim = ConfigDict(dict(
        learning_rate=3e-3,
        warmup_steps=10,
        decay_steps=-1,           # cosine decay length; -1 = train.steps
        end_lr_factor=0.1,        # final lr = learning_rate * end_lr_factor
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip_norm=1.0,       # 0 = no clipping
        # No weight decay on params whose path ("layer_0/mixer/a_proj/kernel"; under scan_layers
        # "groups/block_0/mixer/a_proj/kernel") matches one of these comma-separated regexes
        # (re.search). Names decide, never ranks, so the choice is the same with and without
        # scan_layers. Exempt: norm scales (mixer_norm, mlp_norm, final_norm, o_norm); biases
        # (dense biases, ssd/gdn dt_bias); per-head gate parameters (ssd/gdn A_log, ssd D,
        # attn/swa sinks); decay/step gate projections (gdn a_proj, gdn/deltanet b_proj, ssd
        # dt_proj, gla gk_proj_a/gk_proj_b, titans lr/momentum/decay_proj); titans' learned
        # initial memory (memory_w1, memory_w2: decay would pull it to the zero MLP, whose
        # gradients vanish); brt's attention scales (attn_scale, ...: the temperatures of its
        # normalised q/k), learned initial state and state position embeddings (initial_state,
        # state_pos: decay would pull the S state vectors together); RMT's learned first
        # memory (segment_memory: decay would pull the m vectors to zero and together);
        # Titans MAG/MAC's persistent memory tokens (persistent_k, persistent_v: likewise).
        # Decayed: embeddings, lm_head, q/k/v/o/g projections (brt's state_q/k/v/q2/out and
        # LSTM gate kernels), MLPs, short-conv kernels. A new parameter that must not decay
        # needs a pattern here.
        no_decay_patterns="norm,bias,A_log,(^|/)D$,sinks,a_proj/,b_proj/,dt_proj/,gk_proj,"
                          "lr_proj/,momentum_proj/,decay_proj/,memory_w[12]$,_scale$,"
                          "initial_state$,state_pos$,(^|/)segment_memory$,persistent_[kv]$",
        # Memory layers' value tables (pkm's per-layer `mlp/values`, memory_plus's shared
        # `memory_values`; the params whose path matches one of the comma-separated regexes):
        # their own AdamW, by default as the Memory+ reference code (facebookresearch/memory)
        # trains them. False / False / False below is this project's earlier setting (a
        # constant rate, memory_values.weight_decay, one clip over all parameters).
        memory_values=ConfigDict(dict(
            patterns="(^|/)(memory_)?values$",
            learning_rate=1e-3,       # the values' peak rate (the reference's value_fixed_lr)
            follow_schedule=True,     # warmup + cosine as the main rate (False: constant)
            decay_like_main=True,     # optim.weight_decay, the reference's one weight decay for
                                      # every group (False: memory_values.weight_decay)
            weight_decay=0.0,         # used only with decay_like_main=False
            separate_clip=True,       # values clipped by their own global norm, the rest by
                                      # theirs, both at grad_clip_norm (False: one norm)
        )),
    ))

    c.train = ConfigDict(dict(
        steps=100,
        batch_size=8,             # global batch (sequences per optimizer step)
        seq_len=128,
        grad_accum_steps=1,       # micro-batches per step (batch_size must divide)
        log_every=10,
        eval_every=50,            # 0 = only at the end
        eval_batches=4,           # validation batches per evaluation (0 = no evaluation)
        checkpoint_every=50,      # 0 = only at the end (and on SIGTERM)
        seed=0,
        compute_dtype="float32",  # float32 | bfloat16 (params stay float32)
        max_consecutive_nonfinite=5,
        init_from="",             # "" = random init; else a workdir or checkpoint whose params
                                  # start a new run (e.g. from `python -m mem_lm.convert`)
    ))

    # context: devices that split each sequence (T) into contiguous slices. The token mixers
    # that support it (Mechanism.context_parallel: gdn, deltanet, kda, la, gla, retnet,
    # lightning, ssd, attn, swa, mla) exchange only what crosses a slice boundary: the
    # recurrent ops' state maps, the short convs' last inputs, sliding windows' last keys;
    # full attention all-gathers K/V (mla its latents). train.seq_len must split evenly;
    # rules.length must be "context"; the other mixers and segment recurrence are errors.
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))

    c.rules = ConfigDict(dict(
        batch="data,fsdp",
        length="context",         # activations' (and batches') T axis: mesh.context splits it
        embed="fsdp",
        heads="tensor",
        kv="",
        mlp="tensor",
        vocab="tensor",
        memory="tensor",
        # moe's experts [expert, embed, mlp]: whole experts per tensor shard (expert sorts
        # before mlp, so it takes tensor there; layers/moe.py).
        expert="tensor",
    ))

    c.checkpoint = ConfigDict(dict(
        enabled=True,
        dir="",                   # "" = WORKDIR/checkpoints
        keep=3,
        async_save=True,
    ))

    c.logging = ConfigDict(dict(
        progress_bar=True,
        tensorboard=True,
        jsonl=True,
        peak_tflops=0.0,          # per device, for MFU; 0 = a table by device kind (rough on CPU)
    ))

    c.distributed = ConfigDict(dict(
        initialize=False,         # call jax.distributed.initialize (also with the env/flags below)
        coordinator_address="",   # host:port; "" = JAX_COORDINATOR_ADDRESS or auto-detect
        num_processes=-1,         # -1 = JAX_NUM_PROCESSES or auto-detect
        process_id=-1,            # -1 = JAX_PROCESS_ID or auto-detect
    ))

    c.sample = ConfigDict(dict(
        enabled=False,            # print a generated sample at the end (text sources)
        prompt="def ",
        max_new_tokens=200,
        temperature=0.8,
        top_k=40,
    ))
    return c
