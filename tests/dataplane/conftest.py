"""The compiled data plane's tests: skipped where the module is not built, unless the
build said it succeeded (``JVPN_REQUIRE_COMPILED=1``, set by ``make test``), where a
missing module is a failure rather than a silent skip."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from session import dataplane


@pytest.fixture(scope="session")
def compiled() -> ModuleType:
    module = dataplane.compiled_module()
    if module is None:
        if os.environ.get("JVPN_REQUIRE_COMPILED") == "1":
            pytest.fail("the compiled data plane was built but jvpn_dataplane does not import")
        pytest.skip("the compiled data plane (jvpn_dataplane) is not installed")
    return module
