"""The domain: images, versions, builds, MicroVMs, tokens, tags. Nothing here knows HTTP or sandboxes."""

# Importing the operation modules registers their handlers in core.OPERATIONS.
from openmicrovm.service import builds, images, managed, microvms, tags, tokens, versions  # noqa: F401
from openmicrovm.service.core import OPERATIONS, Service

__all__ = ["OPERATIONS", "Service"]
