"""GDN + sliding-window attention hybrid (2 GDN : 1 SWA), same size and training as
gdn_small.py."""
from configs.gdn_small import small


def get_config():
    return small(("gdn", "gdn", "swa"))
