"""The acceptor: owns every registered session and grants leases to sidecar workers."""
