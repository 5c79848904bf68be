"""diagram.py: a device's negotiation as Mermaid and as an SVG laid out like seed 000."""

import xml.etree.ElementTree as ET

from xenbed.harness.diagram import device_of, devices, render_markdown, render_mermaid, render_svg

BACK = "/local/domain/0/backend/vbd/1/51712"
FRONT = "/local/domain/1/device/vbd/51712"


def t(ts, role, old, new):
    return {"ts": ts, "kind": "transition", "path": BACK if role == "backend" else FRONT,
            "role": role, "from": old, "to": new, "service": "dom0" if role == "backend" else "domu1"}


# seed 000: Device Initialisation, then Device Closedown started by the backend
INIT_AND_CLOSEDOWN = [
    t(1.0, "backend", "Initialising", "InitWait"),
    t(1.1, "frontend", "Initialising", "Initialised"),
    t(1.2, "backend", "InitWait", "Connected"),
    t(1.3, "frontend", "Initialised", "Connected"),
    t(2.0, "backend", "Connected", "Closing"),
    t(2.1, "frontend", "Connected", "Closing"),
    t(2.2, "frontend", "Closing", "Closed"),
    t(2.3, "backend", "Closing", "Closed"),
]


def test_a_backend_dir_and_a_frontend_dir_name_one_device():
    assert device_of(BACK) == device_of(FRONT) == FRONT
    assert devices(INIT_AND_CLOSEDOWN) == [FRONT]


def test_init_and_closedown_as_mermaid():
    assert render_mermaid(INIT_AND_CLOSEDOWN, BACK).splitlines() == [
        "sequenceDiagram",
        f"    %% device {FRONT}",
        "    participant B as Backend",
        "    participant F as Frontend",
        "    B->>F: InitWait",        # the frontend's next move answers it
        "    F->>B: Initialised",     # seed: Initialised -> backend
        "    B->>F: Connected",       # seed: Connected -> frontend
        "    Note over F: Connected",
        "    B->>F: Closing",         # seed: Closing -> Closing
        "    Note over F: Closing",   # the frontend flushes, then closes itself
        "    F->>B: Closed",          # seed: Closed <- Closed
        "    Note over B: Closed",
    ]


def test_a_transition_the_seed_forbids_is_marked():
    records = [t(1.0, "frontend", "Initialising", "Reconfigured")]
    assert "    Note over F: Reconfigured (not allowed)" in render_mermaid(records, FRONT).splitlines()


def test_hotplug_records_add_the_hotplug_column():
    records = [{"ts": 0.5, "kind": "hotplug", "path": BACK, "event": "write physdets"},
               t(1.0, "backend", "InitWait", "Connected")]
    lines = render_mermaid(records, FRONT).splitlines()
    assert lines[2:5] == ["    participant H as Hotplug", "    participant B as Backend", "    participant F as Frontend"]
    assert "    H->>B: write physdets" in lines


def test_chaos_operations_are_notes_across_the_columns():
    records = INIT_AND_CLOSEDOWN[:2] + [
        {"ts": 1.05, "kind": "chaos", "type": "invoke", "action": "pause", "service": "domu1", "detail": {}},
        {"ts": 1.06, "kind": "chaos", "type": "ok", "action": "pause", "service": "domu1", "detail": {}}]
    lines = render_mermaid(records, FRONT).splitlines()
    assert "    Note over B,F: chaos: pause domu1" in lines
    assert sum("chaos" in line for line in lines) == 1  # "ok" is not drawn


def test_svg_is_xml_with_one_label_per_transition():
    svg = render_svg(INIT_AND_CLOSEDOWN, FRONT)
    root = ET.fromstring(svg.encode())
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    labels = [e.text for e in root.iter(f"{ns}text") if e.get("class") == "transition"]
    assert labels == [r["to"] for r in INIT_AND_CLOSEDOWN]
    headings = [e.text for e in root.iter(f"{ns}text")]
    assert {"Hotplug", "Xenbus Backend", "Xenbus Frontend"} <= set(headings)
    assert len([e for e in root.iter(f"{ns}line") if e.get("marker-end")]) == 5  # as the Mermaid arrows


def test_svg_of_every_device_and_of_none():
    other = [dict(r, path=r["path"].replace("51712", "51728")) for r in INIT_AND_CLOSEDOWN]
    root = ET.fromstring(render_svg(INIT_AND_CLOSEDOWN + other).encode())
    assert len(root.findall("{http://www.w3.org/2000/svg}g")) == 2
    ET.fromstring(render_svg([]).encode())
    assert "no device transitions" in render_markdown([])
    assert render_markdown(INIT_AND_CLOSEDOWN, "t").count("```mermaid") == 1
