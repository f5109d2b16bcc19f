"""Operator tooling: ``python -m services.admin`` (console script ``emailsched-admin``)."""
