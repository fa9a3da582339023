"""The kopf operator (SessionSlice reconciliation, injection, scaling metrics).

Mapped into the ``backdial`` namespace from ``operator/`` so the folder never
shadows the standard library's ``operator`` module.  Its work arrives with the
operator issue; until then ``backdial operator`` reports that it is not built.
"""
