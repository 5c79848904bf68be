"""Host side of xenbed: run the compose topology, wait on it, and drive it from pytest.

The public face is small: `Testbed` (containers: lifecycle, exec, chaos) and
`Xen`, its Xen view (hosts, dom0s, domains, devices), `wait_for` and the
errors they raise, and `BlockWorkload` / `check_nothing_lost` for "nothing
lost" checks.
"""

from .compose import ComposeError, Project, load_project
from .execs import ExecError, ExecResult
from .resources import reap_stale_runs
from .status import render_status_table
from .testbed import Testbed, TestbedError
from .waits import WaitTimeout, wait_for
from .workload import BlockWorkload, check_nothing_lost
from .xen import Xen

__all__ = ["Testbed", "TestbedError", "Xen", "ExecResult", "ExecError", "wait_for", "WaitTimeout",
           "load_project", "Project", "ComposeError", "reap_stale_runs", "render_status_table",
           "BlockWorkload", "check_nothing_lost"]
