"""Benchmarks (run with ``python3 -m pytest benchmarks/... --benchmark-only -s``).

The real topology fixtures (``scale_cluster``, ``scale_cluster_factory``) come from
the ``sqlalchemy_scale.testing`` plugin, registered through the package's pytest11
entry point; nothing needs to be declared here.
"""
