"""mem_lm: the language model as a library.

    from mem_lm import ModelConfig, LanguageModel, generate
    model, variables = mem_lm.load_pretrained("runs/demo")     # a training run's checkpoint
"""
from mem_lm.config import (ModelConfig, channel_mixers, recurrent_mixers,
                           token_mixers)
from mem_lm.model import LanguageModel, apply_with_aux, init_cache, param_count
from mem_lm.generate import decode_step, generate, prefill, sample_logits
from mem_lm.pretrained import load_pretrained

__all__ = ["ModelConfig", "LanguageModel", "apply_with_aux", "generate", "init_cache", "param_count",
           "token_mixers", "channel_mixers", "recurrent_mixers",
           "prefill", "decode_step", "sample_logits", "load_pretrained"]
