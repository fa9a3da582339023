"""Tests against the real local Kubernetes control plane (see docs/k8s-harness.md)."""
