"""The gvisor driver, split by mechanism: driver.py composes the rest (its docstring lists them)."""

from .driver import GVisorDriver

__all__ = ["GVisorDriver"]
