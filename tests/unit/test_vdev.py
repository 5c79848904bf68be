"""vdev names <-> XenStore device ids (pure), checked against xen-vbd-interface(7)."""

import pytest

from xenbed.protocols.vdev import (
    Vdev,
    VdevError,
    disk_letters,
    number_to_vdev,
    parse_vdev,
    vdev_to_number,
)

# Every row computed by hand from the encoding table of xen-vbd-interface(7):
#    1 << 28 | disk << 8 | partition     xvd, disks or partitions 16 onwards
#  202 << 8 | disk << 4 | partition      xvd, disks and partitions up to 15
#    8 << 8 | disk << 4 | partition      sd, disks and partitions up to 15
#    3 << 8 | disk << 6 | partition      hd, disks 0..1, partitions 0..63
#   22 << 8 | (disk-2) << 6 | partition  hd, disks 2..3, partitions 0..63
TABLE = [
    ("xvda", 51712),                       # 202<<8
    ("xvda1", 51713),
    ("xvda15", 51727),
    ("xvdb", 51728),                       # 202<<8 | 1<<4
    ("xvdb2", 51730),                      # the doc's "d1p2 xvdb2"
    ("xvdc", 51744),
    ("xvdp", 51952),                       # disk 15, the last in 202<<8
    ("xvdp15", 51967),
    ("xvdq", 268439552),                   # disk 16: 1<<28 | 16<<8
    ("xvdq1", 268439553),
    ("xvda16", (1 << 28) | 16),            # partition 16 forces the extended form
    ("xvdb255", (1 << 28) | (1 << 8) | 255),
    ("xvdz", (1 << 28) | (25 << 8)),
    ("xvdaa", (1 << 28) | (26 << 8)),      # letters are bijective base 26
    ("xvdtq37", (1 << 28) | (536 << 8) | 37),  # the doc's "d536p37 xvdtq37"
    ("hda", 768),                          # 3<<8
    ("hda1", 769),
    ("hda63", 831),
    ("hdb", 832),                          # 3<<8 | 1<<6
    ("hdb1", 833),
    ("hdc", 5632),                         # 22<<8
    ("hdc2", 5634),                        # the doc's "hdc2 IDE disk 2 partition 2"
    ("hdd", 5696),                         # 22<<8 | 1<<6
    ("hdd63", 5759),
    ("sda", 2048),                         # 8<<8
    ("sda1", 2049),
    ("sdb", 2064),
    ("sdb3", 2067),                        # the doc's "sdb3 SCSI disk 1 partition 3"
    ("sdp", 2288),                         # disk 15, the last
    ("sdp15", 2303),
]


@pytest.mark.parametrize("name,number", TABLE)
def test_vbd_interface_table(name, number):
    assert vdev_to_number(name) == number
    assert number_to_vdev(number) == name


def test_shifts_spelled_out():
    assert vdev_to_number("xvda") == (202 << 8) | (0 << 4)
    assert vdev_to_number("hda") == 3 << 8
    assert vdev_to_number("hdb") == (3 << 8) | 64
    assert vdev_to_number("hdc") == 22 << 8
    assert vdev_to_number("sda") == 8 << 8
    assert vdev_to_number("xvdq") == (1 << 28) | (16 << 8) == 268439552


@pytest.mark.parametrize("dp,name", [
    ("d0p0", "xvda"), ("d1p2", "xvdb2"), ("d536p37", "xvdtq37"),
    ("d15p15", "xvdp15"), ("d16p0", "xvdq"), ("d0p16", "xvda16"),
    ("d1048575p255", None),
])
def test_dp_syntax_is_xvd(dp, name):
    number = vdev_to_number(dp)
    if name is not None:
        assert number == vdev_to_number(name)
    else:
        assert number == (1 << 28) | (((1 << 20) - 1) << 8) | 255
    v = parse_vdev(dp)
    assert v.kind == "xvd"


def test_parse_vdev_fields():
    assert parse_vdev("xvdb2") == Vdev("xvdb2", "xvd", 1, 2, 51730)
    assert parse_vdev("hdc") == Vdev("hdc", "hd", 2, 0, 5632)
    assert parse_vdev("sdb3") == Vdev("sdb3", "sd", 1, 3, 2067)
    assert parse_vdev("51712") == Vdev("51712", "number", None, None, 51712)


@pytest.mark.parametrize("text,number", [
    ("51712", 51712),
    ("0xca00", 51712),       # hex, as strtoul base 0
    ("0XCA00", 51712),
    ("0145000", 51712),      # octal
    ("0", 0),
    ("768", 768),
    ("2147483647", 2**31 - 1),
])
def test_plain_numbers(text, number):
    assert vdev_to_number(text) == number


def test_disk_letters():
    assert [disk_letters(i) for i in (0, 1, 25, 26, 27, 51, 52, 701, 702)] == [
        "a", "b", "z", "aa", "ab", "az", "ba", "zz", "aaa"]
    assert disk_letters(536) == "tq"


def test_largest_xvd_disk():
    last = "xvd" + disk_letters((1 << 20) - 1)
    assert vdev_to_number(last) == (1 << 28) | (((1 << 20) - 1) << 8)
    with pytest.raises(VdevError, match="out of range"):
        vdev_to_number("xvd" + disk_letters(1 << 20))


@pytest.mark.parametrize("name,message", [
    ("", "empty"),
    ("xvdA", "lowercase"),
    ("xvdaB", "lowercase"),
    ("XVDA", "lowercase"),
    ("Hda", "lowercase"),
    ("xvd", "no disk letter"),
    ("xvd1", "no disk letter"),
    ("hd", "no disk letter"),
    ("xvda0", "partition 0 is the whole disk, write xvda"),
    ("xvda01", "leading zero"),
    ("xvda256", "partition 256 is out of range for xvd devices \\(at most 255\\)"),
    ("hde", "the last is hdd"),
    ("hdt", "the last is hdd"),
    ("hdu", "IDE disk 20 is out of range"),
    ("hda64", "partition 64 is out of range for hd devices \\(at most 63\\)"),
    ("sdq", "SCSI disk 16 is out of range, the last is sdp"),
    ("sdaa", "out of range"),
    ("sda16", "partition 16 is out of range for sd devices \\(at most 15\\)"),
    ("xvda1b", "unexpected 'b' after the partition number"),
    ("xvd-a", "'-' is not a disk letter"),
    (" xvda", "whitespace"),
    ("xvda ", "whitespace"),
    ("d0", "write d<disk>p<partition>"),
    ("d01p0", "leading zeros"),
    ("d1048576p0", "disk 1048576 is out of range"),
    ("d0p256", "partition 256 is out of range"),
    ("-1", "not a virtual disk name"),
    ("+5", "not a virtual disk name"),
    ("2147483648", "does not fit in a C int"),
    ("09", "not a number"),
    ("0x", "not a number"),
    ("12abc", "not a number"),
    ("vda", "not a virtual disk name"),
    ("/dev/xvda", "not a virtual disk name"),
])
def test_bad_names(name, message):
    with pytest.raises(VdevError, match=message) as info:
        vdev_to_number(name)
    if name:
        assert repr(name) in str(info.value)


def test_not_a_string():
    with pytest.raises(VdevError, match="string"):
        parse_vdev(51712)


@pytest.mark.parametrize("number,shown", [
    (0, "0"),
    (1, "1"),
    (3 << 8 | 128, str(3 << 8 | 128)),    # minor >= 128 under major 3 is no hd
    (1 << 28, str(1 << 28)),              # extended form of xvda: not canonical
    ((1 << 28) | (15 << 8) | 15, str((1 << 28) | (15 << 8) | 15)),
    (2 << 28, str(2 << 28)),              # reserved for future use
    (65 << 8, str(65 << 8)),              # Linux sdq: deprecated
    (2**31 - 1, str(2**31 - 1)),
])
def test_number_to_vdev_other_numbers_stay_numbers(number, shown):
    assert number_to_vdev(number) == shown
    assert vdev_to_number(shown) == number


@pytest.mark.parametrize("bad", [-1, 2**31, "51712", True, 1.0])
def test_number_to_vdev_rejects(bad):
    with pytest.raises(VdevError):
        number_to_vdev(bad)


def test_round_trip_over_all_short_names():
    names = []
    for kind, disks, parts in (("xvd", 40, 20), ("hd", 4, 64), ("sd", 16, 16)):
        for d in range(disks):
            for p in range(parts):
                names.append(f"{kind}{disk_letters(d)}{p if p else ''}")
    numbers = set()
    for name in names:
        n = vdev_to_number(name)
        assert number_to_vdev(n) == name
        numbers.add(n)
    assert len(numbers) == len(names)    # no two names share a number
