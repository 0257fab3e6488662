"""Test doubles shared by the test modules (import as ``from fakes.<module> import ...``)."""
