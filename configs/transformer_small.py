"""The softmax-attention baseline of the same size and training as gdn_small.py."""
from configs.gdn_small import small


def get_config():
    return small(("attn",))
