"""backdial sidecar: the client-facing HTTP/1.1 proxy that writes requests onto leased sessions."""
