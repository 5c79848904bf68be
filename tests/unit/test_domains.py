"""The domain table: privileges, credentials, domids (pure, no Docker)."""

import pytest

from xenbed.hypervisor.domains import DomainError, DomainState, DomainTable, Privilege, parse_credentials


@pytest.fixture
def table():
    return DomainTable(parse_credentials("dom0=c0,domu1=c1"))


def code(excinfo):
    return excinfo.value.code


def test_dom0_exists_from_boot_with_its_preprovisioned_credential(table):
    assert table.authenticate("c0").domid == 0
    assert table.get(0).privilege is Privilege.CONTROL


def test_create_gives_increasing_domids_and_preprovisioned_credentials(table):
    dom0 = table.get(0)
    a = table.create(dom0, "domu1", 64)
    b = table.create(dom0, "other", 64)
    assert (a.domid, b.domid) == (1, 2)
    assert a.credential == "c1"
    assert len(b.credential) == 32 and b.credential not in ("c0", "c1")
    assert table.authenticate(b.credential) is b


def test_unknown_credential_is_enoent(table):
    with pytest.raises(DomainError) as e:
        table.authenticate("guess")
    assert code(e) == "ENOENT"


def test_only_the_control_domain_creates_destroys_and_pauses(table):
    dom0 = table.get(0)
    guest = table.create(dom0, "domu1", 64)
    driver = table.create(dom0, "dd", 64, Privilege.BACKEND)
    for caller in (guest, driver):
        with pytest.raises(DomainError) as e:
            table.create(caller, "x", 64)
        assert code(e) == "EPERM"
        with pytest.raises(DomainError) as e:
            table.destroy(caller, guest.domid)
        assert code(e) == "EPERM"
        with pytest.raises(DomainError) as e:
            table.set_paused(caller, guest.domid, True)
        assert code(e) == "EPERM"


def test_names_are_unique_and_validated(table):
    dom0 = table.get(0)
    table.create(dom0, "domu1", 64)
    with pytest.raises(DomainError) as e:
        table.create(dom0, "domu1", 64)
    assert code(e) == "EEXIST"
    for bad in ("", "a b", "x" * 65, "a/b"):
        with pytest.raises(DomainError) as e:
            table.create(dom0, bad, 64)
        assert code(e) == "EINVAL"


def test_no_second_control_domain(table):
    with pytest.raises(DomainError) as e:
        table.create(table.get(0), "evil", 64, Privilege.CONTROL)
    assert code(e) == "EPERM"


def test_a_dying_domain_cannot_authenticate_but_its_name_can_be_reused(table):
    dom0 = table.get(0)
    old = table.create(dom0, "domu1", 64)
    table.mark_dying(old.domid)
    with pytest.raises(DomainError) as e:
        table.authenticate("c1")
    assert code(e) == "ESRCH"
    new = table.create(dom0, "domu1", 64)
    assert new.domid != old.domid
    assert table.authenticate("c1") is new


def test_dom0_cannot_be_destroyed_or_paused(table):
    dom0 = table.get(0)
    for call in (lambda: table.destroy(dom0, 0), lambda: table.set_paused(dom0, 0, True)):
        with pytest.raises(DomainError) as e:
            call()
        assert code(e) == "EINVAL"


def test_pause_and_unpause(table):
    dom0 = table.get(0)
    guest = table.create(dom0, "g", 64)
    assert table.set_paused(dom0, guest.domid, True).state is DomainState.PAUSED
    assert table.set_paused(dom0, guest.domid, False).state is DomainState.RUNNING


def test_bad_credential_specs_are_refused():
    with pytest.raises(ValueError):
        parse_credentials("dom0")
    assert parse_credentials(" a=1 , b=2 ,") == {"a": "1", "b": "2"}


def test_suspend_and_resume_keep_the_domain(table):
    dom0 = table.get(0)
    guest = table.create(dom0, "g", 64)
    assert table.set_suspended(dom0, guest.domid, True).state is DomainState.SUSPENDED
    with pytest.raises(DomainError) as e:
        table.set_suspended(dom0, guest.domid, True)
    assert code(e) == "EINVAL"
    assert table.set_suspended(dom0, guest.domid, False).state is DomainState.RUNNING
    with pytest.raises(DomainError) as e:
        table.set_suspended(guest, guest.domid, True)
    assert code(e) == "EPERM"
