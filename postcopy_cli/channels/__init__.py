"""Bytes on sockets, no protocol logic: addresses and transport, the memory hand-over, control messages."""
