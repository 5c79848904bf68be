"""Status rows and the table people read."""

from types import SimpleNamespace

from xenbed.harness.status import render_status_table, status_row


def fake_container(name, status, health=None, started="2026-01-02T03:04:05.123456789Z"):
    state = {"Status": status, "StartedAt": started}
    if health:
        state["Health"] = {"Status": health}
    return SimpleNamespace(name=name, status=status, attrs={"State": state}, labels={})


def test_rows():
    assert status_row("dom0", fake_container("p_dom0_1", "running", "healthy")) == {
        "service": "dom0", "container": "p_dom0_1", "state": "running", "health": "healthy",
        "started": "2026-01-02 03:04:05"}
    assert status_row("peer", fake_container("p_peer_1", "created", started="0001-01-01T00:00:00Z"))["started"] == "-"
    assert status_row("domu", None)["state"] == "missing"


def test_table_is_fixed_width_with_a_header():
    table = render_status_table([
        status_row("hypervisor", fake_container("run_hypervisor_1", "running", "healthy")),
        status_row("domu1", fake_container("run_domu1_1", "exited")),
    ])
    header, first, second = table.splitlines()
    assert header.split() == ["SERVICE", "CONTAINER", "STATE", "HEALTH", "STARTED"]
    # every column starts at the same offset on every line
    for column in ("CONTAINER", "STATE", "HEALTH"):
        offset = header.index(column)
        assert first[offset - 2:offset] == "  " and first[offset] != " "
        assert second[offset - 2:offset] == "  " and second[offset] != " "
    assert render_status_table([]) == "(no containers)"
