"""xl config files (pure)."""

import pytest

from xenbed.toolstack.config import ConfigError, DomainConfig, parse


def test_xl_syntax_strings_numbers_lists_comments():
    text = '''
# a guest
name = "domu1"   # trailing comment
memory = 128; vcpus = 1
disk = [ 'format=raw, vdev=xvda, access=rw, target=/var/lib/xen/domu1.img',
         "phy:/dev/loop0,xvdb,w" ]
vif = []
on_crash = 'destroy'
maxmem = 0x100
'''
    settings = parse(text)
    assert settings["name"] == "domu1" and settings["memory"] == 128 and settings["vcpus"] == 1
    assert settings["disk"][1] == "phy:/dev/loop0,xvdb,w"
    assert settings["vif"] == [] and settings["maxmem"] == 256
    cfg = DomainConfig.from_text(text)
    assert (cfg.name, cfg.memory_mb, len(cfg.disks)) == ("domu1", 128, 2)


@pytest.mark.parametrize("text, where", [
    ('name "x"', ":1:"),
    ('name = "x"\nmemory = [1, 2', ":2:"),
    ('name = x', ":1:"),
    ('name = "x" memory = 3', ":1:"),
    ('memory = 64', ":1:"),
    ('name = "x"\nmemory = "lots"', ":1:"),
    ('name = "x"\n$ = 1', ":2:"),
])
def test_bad_configs_say_where(text, where):
    with pytest.raises(ConfigError) as e:
        DomainConfig.from_text(text, "d.cfg")
    assert str(e.value).startswith("d.cfg" + where)
