"""Shipped scenario and preset override files (installed as the ``pipeline.configs`` package)."""
