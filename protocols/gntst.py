"""Grant-operation status codes of Xen's grant_table.h (GNTST_*), their names
and messages.  Shared by the hypervisor, which answers with them, and the
guest API, which reports them: both ends read the one table."""

GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12
GNTST_no_space = -13

GNTST_NAMES = {value: name for name, value in dict(globals()).items() if name.startswith("GNTST_")}
GNTST_VALUES = {name: value for value, name in GNTST_NAMES.items()}

# GNTTABOP_error_msgs, indexed by -status
GNTST_MESSAGES = (
    "okay", "undefined error", "unrecognised domain id", "invalid grant reference",
    "invalid mapping handle", "invalid virtual address", "invalid device address",
    "no spare translation slot in the I/O MMU", "permission denied", "bad page",
    "copy arguments cross page boundary", "page address size too large",
    "operation not done; try again", "out of space",
)


def gntst_message(status: int) -> str:
    return GNTST_MESSAGES[-status] if -len(GNTST_MESSAGES) < status <= 0 else f"status {status}"


def gntst_name(status) -> str:
    """'GNTST_eagain' for -12 or 'GNTST_eagain'; unknown numbers read 'GNTST_<n>'."""
    if isinstance(status, str):
        return status if status.startswith("GNTST_") else f"GNTST_{status}"
    return GNTST_NAMES.get(int(status), f"GNTST_{int(status)}")
