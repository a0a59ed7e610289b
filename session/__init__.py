"""Jumping VPN sans-I/O core: states, wire codec, handshake, keys, framing.

Nothing here reads a clock, opens a socket or awaits: callers pass bytes and
the time in, and read back what to send.
"""

PROTOCOL_VERSION = 1
