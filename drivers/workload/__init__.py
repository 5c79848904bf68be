"""Workloads that run inside a guest and record a history the host checks (harness/checker.py)."""
