"""The L3 tests: real TUN interfaces, routes and nftables, in namespaces each test creates
(and removes, also on failure). Skipped with the reason when this machine cannot run them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from instruments.netlab import Lab, missing_prerequisites


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    why = missing_prerequisites()
    if why is None:
        return
    for item in items:
        if "tests/netns" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=f"L3 namespace tests: {why}"))


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[object]:
    labs: list[Lab] = []

    def make(gateways: int = 3, egress: str = "routed") -> Lab:
        lab = Lab(tmp_path, gateways, egress).up()
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()
