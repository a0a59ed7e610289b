"""The control-plane history check: records of every binding decision in, violations out.

``history.records`` reads event documents into typed records; ``history.check``
checks them (pure: no files, no store). ``jvpn audit check`` reads a
deployment's audit stream or event files and runs it.
"""
