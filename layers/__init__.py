"""layers package: one file per mechanism. Importing the package registers every mechanism
(layers/registry.py), in the order of the imports below; a new layer file is added here."""
from layers import attention  # noqa: F401
from layers import linear_attention  # noqa: F401
from layers import ssd  # noqa: F401
from layers import gated_deltanet  # noqa: F401
from layers import kda  # noqa: F401
from layers import mlp  # noqa: F401
from layers import mom  # noqa: F401
from layers import memory  # noqa: F401
from layers import moe  # noqa: F401
from layers import nsa  # noqa: F401
from layers import titans  # noqa: F401
from layers import titans_mag  # noqa: F401
from layers import titans_mac  # noqa: F401
from layers import brt  # noqa: F401
from layers import mla  # noqa: F401
