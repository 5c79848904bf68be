"""`xenbed trace` and `xenbed xl` (no Docker: xl's testbed is a stand-in)."""

import json
import xml.etree.ElementTree as ET

from xenbed.harness import cli
from xenbed.harness.execs import ExecResult

BACK, FRONT = "/local/domain/0/backend/vbd/1/51712", "/local/domain/1/device/vbd/51712"


def write_trace(path, devices=(51712,)):
    lines = []
    for n in devices:
        lines += [{"ts": 1.0, "kind": "transition", "path": f"/local/domain/0/backend/vbd/1/{n}", "role": "backend",
                   "from": "Initialising", "to": "InitWait"},
                  {"ts": 2.0, "kind": "transition", "path": f"/local/domain/1/device/vbd/{n}", "role": "frontend",
                   "from": "Initialising", "to": "Initialised"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_trace_as_mermaid(tmp_path, capsys):
    assert cli.main(["trace", write_trace(tmp_path / "t.jsonl")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "sequenceDiagram" and "    B->>F: InitWait" in out and "    Note over F: Initialised" in out  # nothing answered it yet


def test_trace_of_one_device_as_svg_to_a_file(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", devices=(51712, 51728))
    assert cli.main(["trace", trace, "--device", BACK, "--format", "svg", "-o", str(tmp_path / "d.svg")]) == 0
    root = ET.parse(tmp_path / "d.svg").getroot()
    assert [e.text for e in root.iter("{http://www.w3.org/2000/svg}text") if e.get("class") == "transition"] == \
        ["InitWait", "Initialised"]


def test_trace_says_which_devices_there_are(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.jsonl", devices=(51712, 51728))
    assert cli.main(["trace", trace]) == 2
    assert "--device" in capsys.readouterr().err
    assert cli.main(["trace", trace, "--device", "/local/domain/1/device/vif/0"]) == 1
    assert FRONT in capsys.readouterr().err
    assert cli.main(["trace", trace, "--format", "markdown"]) == 0
    assert capsys.readouterr().out.count("```mermaid") == 2


def test_xl_is_forwarded_to_dom0_with_its_status(monkeypatch, capsys):
    calls = []

    class Bed:
        def __init__(self, project, client=None):
            calls.append(project)

        def dom0(self, which=None):  # the dom0 of host `which` (Xen.dom0): here "dom0-<host>"
            return "dom0" if which is None else f"dom0-{which}"

        def exec(self, service, cmd):
            calls.append((service, cmd))
            return ExecResult(3, "Name ID\n", "oops\n")

    monkeypatch.setattr(cli, "Testbed", Bed)
    monkeypatch.setattr(cli, "Xen", lambda bed: bed)  # Bed answers for the Xen view too
    monkeypatch.setattr(cli, "connect", lambda: None)
    assert cli.main(["xl", "-p", "run1", "list", "-l"]) == 3
    assert calls == ["run1", ("dom0", ["xl", "list", "-l"])]
    captured = capsys.readouterr()
    assert captured.out == "Name ID\n" and captured.err == "oops\n"
    calls.clear()
    assert cli.main(["xl", "-p", "run1", "--xen-host", "b", "list"]) == 3
    assert calls == ["run1", ("dom0-b", ["xl", "list"])]
