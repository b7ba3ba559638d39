"""Host memory and RAM blocks: mappings, the pagemap scanner."""
from .mappings import *  # noqa: F401,F403  (the package's public face)
from .mappings import __all__  # noqa: F401
