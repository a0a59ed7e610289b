"""Lab instruments: benchmarks, the local cluster launcher, the demo, path impairment.

They drive the product (gateway, agent, store, session) from outside; the
product never imports them (an import contract in pyproject.toml says so).
Entry point: ``jvpn-lab`` (``instruments.cli``), also ``python -m instruments``.
"""
