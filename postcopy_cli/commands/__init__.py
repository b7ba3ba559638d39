"""One module per subcommand; ALL_COMMANDS is what the ``postcopy`` group lists."""
from .migrate import migrate
from .probe import probe
from .selftest import selftest
from .send_discards import send_discards
from .serve_dest import serve_dest
from .tls_creds import tls_creds
from .workload import workload
from .workset import workset

ALL_COMMANDS = [probe, serve_dest, migrate, send_discards, selftest, workload, workset, tls_creds]
