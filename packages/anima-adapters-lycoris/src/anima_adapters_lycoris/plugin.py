"""anima-adapters-lycoris' plugin module (entry point ``anima_adapters_lycoris``): registers ``lokr``, ``loha`` and
``locon``. The option and spec modules import neither torch nor lycoris; ``build`` and ``file_deltas`` do."""

from anima_adapters_lycoris.variants import LOCON, LOHA, LOKR
from anima_core import hookimpl


@hookimpl
def anima_register_adapters(register):
    register(LOKR)
    register(LOHA)
    register(LOCON)
