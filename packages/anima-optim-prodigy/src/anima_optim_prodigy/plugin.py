"""anima-optim-prodigy's plugin module (entry point ``anima_optim_prodigy``): registers its two optimizers.
The option modules import no optimizer library; ``build`` does."""

from anima_core import hookimpl
from anima_optim_prodigy.prodigy import PRODIGY
from anima_optim_prodigy.prodigy_plus_schedulefree import PRODIGY_PLUS_SCHEDULEFREE


@hookimpl
def anima_register_optimizers(register):
    register(PRODIGY)
    register(PRODIGY_PLUS_SCHEDULEFREE)
