"""Uplink mode: a router whose WAN is a client of another BitMesh hotspot (issue 11, resale)."""
