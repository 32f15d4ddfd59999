"""Shared fixtures. The real topology comes from the sqlalchemy_scale.testing plugin
(registered through the package's pytest11 entry point)."""
