"""Kernel network devices for the L3 tunnel: TUN interfaces and netlink configuration.

Shared by the agent and the gateway adapters; knows nothing of sessions, stores or
either side's internals (an import-linter contract).
"""
