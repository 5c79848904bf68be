"""xl disk specs (xl-disk-configuration(5)), pure."""

import pytest

from xenbed.toolstack.disk_spec import DiskSpec, DiskSpecError, parse_disk_spec

# The man page: "For example, these strings are equivalent:"
HDA_EQUIVALENT = [
    "/dev/vg/guest-volume,,hda",
    "/dev/vg/guest-volume,raw,hda,rw",
    "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
    "raw:/dev/vg/guest-volume,hda,w",
]
# "As are these:"
CDROM_EQUIVALENT = [
    "/root/image.iso,,hdc,cdrom",
    "/root/image.iso,,hdc,,cdrom",
    "/root/image.iso,raw,hdc,devtype=cdrom",
    "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
    "raw:/root/image.iso,hdc:cdrom,ro",
    "/root/image.iso,,hdc:cdrom,r",
]


@pytest.mark.parametrize("text", HDA_EQUIVALENT)
def test_man_page_hda_forms_are_equivalent(text):
    d = parse_disk_spec(text)
    assert d == DiskSpec(target="/dev/vg/guest-volume", vdev="hda", devnum=768)
    assert d.format == "raw" and not d.readonly and d.mode == "w"
    assert not d.is_cdrom and d.device_type == "disk"
    assert d.backend is None and d.backendtype is None and d.script is None
    assert d.discard_enable is None


@pytest.mark.parametrize("text", CDROM_EQUIVALENT)
def test_man_page_cdrom_forms_are_equivalent(text):
    d = parse_disk_spec(text)
    assert d == DiskSpec(target="/root/image.iso", vdev="hdc", devnum=5632,
                         readonly=True, is_cdrom=True)
    assert d.mode == "r" and d.device_type == "cdrom" and d.removable


def test_man_page_config_line_items():
    a, b = (parse_disk_spec(s) for s in ("/dev/vg/guest-volume,,hda", "/root/image.iso,,hdc,cdrom"))
    assert (a.devnum, b.devnum) == (768, 5632)


def test_brief_examples():
    d = parse_disk_spec("format=raw, vdev=xvdb, access=rw, target=/tmp/x")
    assert (d.target, d.vdev, d.devnum, d.mode) == ("/tmp/x", "xvdb", 51728, "w")
    d = parse_disk_spec("/root/image.iso,,hdc:cdrom,r")
    assert d.is_cdrom and d.readonly


# ---- defaults and access ----------------------------------------------------

@pytest.mark.parametrize("access,readonly", [
    ("r", True), ("ro", True), ("w", False), ("rw", False), ("", False)])
def test_access_values(access, readonly):
    assert parse_disk_spec(f"/x,,xvda,{access}").readonly is readonly
    assert parse_disk_spec(f"access={access}, vdev=xvda, target=/x").readonly is readonly


def test_cdrom_is_always_read_only_as_libxl_forces_it():
    assert parse_disk_spec("/x.iso,,hdc,rw,cdrom").readonly
    assert parse_disk_spec("access=rw, devtype=cdrom, vdev=xvdc, target=/x.iso").mode == "r"


def test_empty_cdrom_drive():
    for text in (",hdc:cdrom,r",            # xend's syntax, still supported
                 "vdev=hdc, devtype=cdrom",
                 "cdrom,vdev=hdc",
                 ",,hdc,cdrom",
                 "vdev=hdc,cdrom,target="):
        d = parse_disk_spec(text)
        assert d.target == "" and d.is_cdrom and d.readonly, text
        assert d.format == "empty" and d.path is None


def test_devtype_disk_and_deprecated_disk_suffix():
    assert not parse_disk_spec("/x,,xvda,devtype=disk").is_cdrom
    d = parse_disk_spec("phy:/x,xvda:disk,w")
    assert d.vdev == "xvda" and not d.is_cdrom


@pytest.mark.parametrize("fmt", ["raw", "qcow", "qcow2", "vhd", "qed"])
def test_formats(fmt):
    assert parse_disk_spec(f"/img,{fmt},xvda").format == fmt
    assert parse_disk_spec(f"format={fmt},vdev=xvda,target=/img").format == fmt


def test_empty_format_means_raw():
    assert parse_disk_spec("format=,vdev=xvda,target=/img").format == "raw"


# ---- target ----------------------------------------------------------------

def test_target_swallows_the_rest_commas_colons_and_whitespace():
    d = parse_disk_spec("vdev=xvda, access=r, target=/images/a,b:c=d e ")
    assert d.target == "/images/a,b:c=d e "
    assert d.readonly


def test_target_drops_one_trailing_comma():
    assert parse_disk_spec("vdev=xvda,target=/x,").target == "/x"
    assert parse_disk_spec("vdev=xvda,target=/x,,").target == "/x,"


def test_target_keyword_may_replace_an_empty_positional_target():
    d = parse_disk_spec(",,xvda,w,target=/x")
    assert d.target == "/x"


def test_relative_target_gets_dev_prepended_in_path():
    d = parse_disk_spec("vg/guest,,xvda")
    assert d.target == "vg/guest" and d.path == "/dev/vg/guest"
    assert parse_disk_spec("/abs,,xvda").path == "/abs"


def test_leading_whitespace_is_ignored():
    d = parse_disk_spec("  \t/x,  raw,\txvdb,  ro")
    assert (d.target, d.format, d.vdev, d.readonly) == ("/x", "raw", "xvdb", True)


# ---- deprecated prefixes ----------------------------------------------------

@pytest.mark.parametrize("text,fmt,script,target", [
    ("phy:/dev/loop0,xvda,w", "raw", None, "/dev/loop0"),
    ("file:/img,xvda,w", "raw", None, "/img"),
    ("tap:aio:/img,xvda,w", "raw", None, "/img"),
    ("tap2:aio:/img,xvda,w", "raw", None, "/img"),
    ("tapdisk:aio:/img,xvda,w", "raw", None, "/img"),
    ("aio:/img,xvda,w", "raw", None, "/img"),
    ("ioemu:/img,xvda,w", "raw", None, "/img"),
    ("tap:qcow2:/img.qcow2,xvda,w", "qcow2", None, "/img.qcow2"),
    ("tap:qcow:/img.qcow,xvda,w", "qcow", None, "/img.qcow"),
    ("tap:vhd:/img.vhd,xvda,w", "vhd", None, "/img.vhd"),
    ("raw:/img,xvda,w", "raw", None, "/img"),
    ("qcow2:/img,xvda,w", "qcow2", None, "/img"),
    ("iscsi:iqn.2001-05.com.example:disk0,xvda,w", "raw", "block-iscsi",
     "iqn.2001-05.com.example:disk0"),
    ("nbd:host:1234,xvda,w", "raw", "block-nbd", "host:1234"),
    ("enbd:host:1234,xvda,w", "raw", "block-enbd", "host:1234"),
    ("drbd:res0,xvda,w", "raw", "block-drbd", "res0"),
])
def test_deprecated_prefixes(text, fmt, script, target):
    d = parse_disk_spec(text)
    assert (d.format, d.script, d.target) == (fmt, script, target)
    assert (d.vdev, d.devnum, d.readonly) == ("xvda", 51712, False)


def test_deprecated_prefix_means_no_format_slot():
    # [<format>:]<target>,<vdev>[:<devtype>],<access>
    d = parse_disk_spec("phy:/dev/loop0,xvdb:cdrom,r")
    assert d.vdev == "xvdb" and d.is_cdrom


def test_script_target_has_no_path():
    d = parse_disk_spec("script=block-iscsi,vdev=xvda,target=iqn.x:y")
    assert d.script == "block-iscsi" and d.path is None


# ---- other parameters and flags ------------------------------------------------

def test_keywords_and_flags():
    d = parse_disk_spec("backend=driverdom, backendtype=phy, script=block-foo, direct-io-safe,"
                        " no-discard, untrusted, specification=xen, no-colo,"
                        " vdev=xvdc, target=/x")
    assert d.backend == "driverdom" and d.backendtype == "phy" and d.script == "block-foo"
    assert d.direct_io_safe and d.discard_enable is False and d.trusted is False
    assert parse_disk_spec("/x,,xvda,discard,trusted").discard_enable is True
    assert parse_disk_spec("/x,,xvda,discard,trusted").trusted is True


@pytest.mark.parametrize("bt", ["phy", "qdisk", "tap", "standalone"])
def test_backendtypes(bt):
    assert parse_disk_spec(f"backendtype={bt},/x,,xvda").backendtype == bt


def test_empty_backend_means_dom0():
    assert parse_disk_spec("backend=,/x,,xvda").backend is None


def test_repeating_the_same_value_is_fine():
    d = parse_disk_spec("format=raw,/x,xvda,cdrom,devtype=cdrom,discard,discard,format=raw")
    assert d.is_cdrom and d.discard_enable


def test_format_keyword_takes_the_positional_format_slot_away():
    # as libxlu: once the format is known, the next positional is the vdev
    d = parse_disk_spec("format=qcow2,/x,xvda,r")
    assert (d.format, d.vdev, d.readonly) == ("qcow2", "xvda", True)


def test_vdev_forms():
    assert parse_disk_spec("/x,,d1p2").devnum == 51730
    assert parse_disk_spec("/x,,51712").devnum == 51712
    assert parse_disk_spec("/x,,xvdq").devnum == 268439552
    assert parse_disk_spec("/x,,sdb3").devnum == 2067


def test_several_specs_make_one_disk_like_block_attach():
    d = parse_disk_spec(["/dev/loop0", "raw", "xvdb", "r"])
    assert (d.target, d.vdev, d.readonly) == ("/dev/loop0", "xvdb", True)
    d = parse_disk_spec(["vdev=xvdb", "target=/a b"])
    assert d.target == "/a b"


# ---- normalised form --------------------------------------------------------

@pytest.mark.parametrize("text", HDA_EQUIVALENT + CDROM_EQUIVALENT + [
    ",hdc:cdrom,r",
    "backend=dd, backendtype=qdisk, script=block-x, direct-io-safe, no-discard, untrusted,"
    " vdev=xvdz, target=iqn,a:b ",
    "vdev=xvda,target=/x,,",
    "nbd:host:1,xvda,w",
    "/x,qcow2,xvda,r,discard,trusted",
])
def test_to_spec_round_trips(text):
    d = parse_disk_spec(text)
    assert parse_disk_spec(d.to_spec()) == d
    assert "target=" not in d.to_spec() or d.to_spec().rindex("target=") > d.to_spec().rindex("vdev=")


def test_to_spec_text():
    assert parse_disk_spec("/dev/vg/guest-volume,,hda").to_spec() == \
        "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume"
    assert parse_disk_spec(",hdc:cdrom,r").to_spec() == "vdev=hdc, access=ro, devtype=cdrom"
    assert parse_disk_spec("/x,,xvda,discard,untrusted,backend=d1").to_spec() == \
        "format=raw, vdev=xvda, access=rw, backend=d1, discard, untrusted, target=/x"


# ---- errors: message and offending token -------------------------------------------

@pytest.mark.parametrize("text,message,token", [
    ("", "no vdev specified", None),
    ("/x", "no vdev specified", None),
    ("/x,raw", "no vdev specified", None),
    ("vdev=xvda", "no target specified", None),
    (",,xvda", "empty target: only a cdrom drive may be empty", ""),
    ("vdev=xvda,target=", "empty target", ""),
    ("/x,hda,w", "unknown value for format.*positional order is target,format,vdev,access",
     "hda"),
    ("/x,bogus,xvda", "unknown value for format", "bogus"),
    ("format=vmdk,/x,,xvda", "unknown value for format", "format=vmdk"),
    ("/x,,xvda,rx", "unknown value for access", "rx"),
    ("access=rwx,/x,,xvda", "unknown value for access", "access=rwx"),
    ("/x,,xvda,rw,extra", "too many positional parameters", "extra"),
    ("devtype=floppy,/x,,xvda", "unknown value for devtype", "devtype=floppy"),
    ("backendtype=vbd,/x,,xvda", "unknown value for backendtype", "backendtype=vbd"),
    ("backendtype=,/x,,xvda", "unknown value for backendtype", "backendtype="),
    ("specification=virtio,/x,,xvda", "not supported by xenbed", "specification=virtio"),
    ("specification=foo,/x,,xvda", "unknown value for specification", "specification=foo"),
    ("mode=r,/x,,xvda", "unknown parameter 'mode' \\(did you mean access=\\?\\)", "mode=r"),
    ("foo=bar,/x,,xvda", "unknown parameter 'foo'", "foo=bar"),
    ("/x,,xvda,foo=", "unknown parameter 'foo'", "foo="),
    ("/p=q,,xvda", "bad disk syntax.*target=", "/p=q"),
    ("xx:/y,,xvda", "unknown deprecated disk prefix", "xx:"),
    ("qed:/y,xvda,w", "unknown deprecated disk prefix", "qed:"),
    ("/y,,xvda:", "unknown deprecated disk prefix", "xvda:"),
    ("/x,,xvda:floppy", "unknown deprecated type", "xvda:floppy"),
    ("/x,,xvdA", "'A' is not a disk letter", "xvdA"),
    ("/x,,hde", "the last is hdd", "hde"),
    ("/x,,sdq", "SCSI disk 16 is out of range", "sdq"),
    ("/x,,hda64", "partition 64", "hda64"),
    ("/x,,xvda,,discard,no-discard", "discard respecified \\(was discard\\)", "no-discard"),
    ("format=raw,format=qcow2,/x,,xvda", "format respecified \\(was format=raw\\)",
     "format=qcow2"),
    ("vdev=xvda,vdev=xvdb,target=/x", "vdev respecified", "vdev=xvdb"),
    ("/x,,xvda,target=/y", "target respecified", "target=/y"),
    ("access=ro,/x,,xvda,w", "access respecified \\(was access=ro\\)", "w"),
    ("cdrom,devtype=disk,/x,,hdc", "devtype respecified", "devtype=disk"),
    ("trusted,untrusted,/x,,xvda", "trusted respecified", "untrusted"),
    ("colo,/x,,xvda", "colo is not supported by xenbed", "colo"),
    ("colo-host=a,/x,,xvda", "colo-host is not supported", "colo-host=a"),
    ("active-disk=/a,/x,,xvda", "active-disk is not supported", "active-disk=/a"),
    ("grant_usage=1,/x,,xvda", "grant_usage is not supported", "grant_usage=1"),
    ("format=empty,/x,xvda", "format=empty is only for an empty cdrom", "format=empty"),
    ("/x,empty,xvda", "format=empty is only for an empty cdrom", "empty"),
])
def test_errors_name_the_offending_token(text, message, token):
    with pytest.raises(DiskSpecError, match=message) as info:
        parse_disk_spec(text)
    e = info.value
    assert e.token == token
    assert e.spec == text
    assert repr(text) in str(e)
    if token:
        assert f"near {token!r}" in str(e)
        assert e.offset is not None and text[e.offset:].startswith(token)


def test_error_offsets_in_multi_specs():
    with pytest.raises(DiskSpecError) as info:
        parse_disk_spec(["/x", "raw", "xvda", "rx"])
    assert info.value.token == "rx" and info.value.spec[info.value.offset:] == "rx"


def test_non_string_spec():
    with pytest.raises(DiskSpecError, match="must be a string"):
        parse_disk_spec([b"/x,,xvda"])


def test_diskspec_error_is_a_value_error():
    assert issubclass(DiskSpecError, ValueError)
