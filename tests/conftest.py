"""Shared test setup: every test session gets its own empty trust store."""

import os
import tempfile


def pytest_configure(config):
    # Exports record their hashes in the user's trust store; tests must neither read the real
    # one nor fill it. Set at configure time so module fixtures and subprocesses inherit it.
    os.environ["FLASH_EXPORT_TRUST_STORE"] = tempfile.mkdtemp(prefix="flash_export_trust_")
