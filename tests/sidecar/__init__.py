"""Sidecar proxy tests (HTTP/1.1 proxy, session side, classification, PROXY protocol)."""
