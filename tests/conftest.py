"""Suite-wide markers: `long` tests run only with JPAGED_LONG_TESTS=1 (CI runs the short profile)."""
import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("JPAGED_LONG_TESTS"):
        return
    skip = pytest.mark.skip(reason="long profile; set JPAGED_LONG_TESTS=1 to run it")
    for item in items:
        if item.get_closest_marker("long"):
            item.add_marker(skip)
