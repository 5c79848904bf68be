"""xenbed: Xen's split-driver protocols on a Docker engine.

The package is spread over the repository by room (DESIGN.md): `protocols`
(pure codecs shared by both ends), `hypervisor`, `drivers`, `toolstack` and
`harness`.  Inside the containers the same tree is copied to /opt/xenbed.
"""

__version__ = "0.1.0"
