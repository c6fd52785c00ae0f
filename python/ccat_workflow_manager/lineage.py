"""Lineage, both ways: which runs and raw data packages made a product, and which products
were derived from a raw data package (SPEC §7)."""

from __future__ import annotations

from typing import Any

from dynaconf import Dynaconf

from ccat_workflow_manager import _core
from ccat_workflow_manager.config import to_rust


def product_lineage(product_id: int, settings: Dynaconf | None = None) -> dict[str, Any] | None:
    """The product, every run of its chain (its own first, across steps, each with the
    raw data packages and products it read), and every raw data package the chain read;
    None when there is no such product."""
    return _core.product_lineage(to_rust(settings), product_id)


def derived_products(package_id: int, settings: Dynaconf | None = None) -> list[dict[str, Any]]:
    """Every product derived from a raw data package, directly or through other products."""
    return _core.derived_products(to_rust(settings), package_id)
