"""ARN formats of spec §1.2 and the identifier rules that go with them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from openmicrovm.service.context import RequestContext
from openmicrovm.service.errors import AccessDeniedError, NotFoundError, ValidationError

MANAGED_ACCOUNT = "aws"
_IMAGE_ARN = re.compile(
    r"arn:(?P<partition>aws[a-z-]*):lambda:(?P<region>[a-z0-9-]+):(?P<account>[0-9]{12}|aws)"
    r":microvm-image:(?P<name>[a-zA-Z0-9_-]{1,64})"
)
_CONNECTOR_ARN = re.compile(
    r"arn:(?P<partition>aws[a-z-]*):lambda:(?P<region>[a-z0-9-]+):(?P<account>[0-9]{12}|aws)"
    r":network-connector:(?P<rest>.+)"
)
_MANAGED_CONNECTOR = re.compile(r"aws-network-connector:(?P<kind>[A-Z_]+)")
_CUSTOMER_CONNECTOR = re.compile(r"[a-zA-Z0-9_-]+(:[1-9][0-9]*)?")

INGRESS_CONNECTORS = ("HTTP_INGRESS", "ALL_INGRESS", "SHELL_INGRESS", "NO_INGRESS")
EGRESS_CONNECTORS = ("INTERNET_EGRESS",)


@dataclass(frozen=True)
class ImageArn:
    partition: str
    region: str
    account: str
    name: str

    def __str__(self) -> str:
        return f"arn:{self.partition}:lambda:{self.region}:{self.account}:microvm-image:{self.name}"


def image_arn(context: RequestContext, name: str) -> str:
    return str(ImageArn("aws", context.region, context.account, name))


def managed_connector_arn(region: str, kind: str) -> str:
    return f"arn:aws:lambda:{region}:aws:network-connector:aws-network-connector:{kind}"


def parse_image_arn(value: str) -> ImageArn:
    """The live service accepts only full ARNs on every image operation but Create."""
    match = _IMAGE_ARN.fullmatch(value)
    if match is None:
        raise ValidationError(f"Invalid ARN format: {value}")
    return ImageArn(**match.groupdict())


def require_own_image_arn(context: RequestContext, value: str, not_found_message: str) -> ImageArn:
    """An ARN of the caller's account and region. Another account's ARN is a 403, as on AWS;
    another region's cannot exist here, so it is not found."""
    arn = parse_image_arn(value)
    if arn.account == MANAGED_ACCOUNT:
        raise NotFoundError(not_found_message)
    if arn.account != context.account:
        raise AccessDeniedError(
            f"User is not authorized to access MicroVM image {value}: it belongs to another account."
        )
    if arn.region != context.region:
        raise NotFoundError(not_found_message)
    return arn


@dataclass(frozen=True)
class Connector:
    arn: str
    kind: str | None  # the managed kind (HTTP_INGRESS, ...) or None for a customer VPC connector


def parse_connector(context: RequestContext, value: str, field: str) -> Connector:
    match = _CONNECTOR_ARN.fullmatch(value)
    if match is None:
        raise ValidationError(f"Invalid network connector ARN at '{field}': {value}")
    if match["region"] != context.region:
        raise ValidationError(
            f"Network connector {value} is in region {match['region']}; "
            f"it must be in the MicroVM's region {context.region}."
        )
    rest = match["rest"]
    if match["account"] == MANAGED_ACCOUNT:
        managed = _MANAGED_CONNECTOR.fullmatch(rest)
        if managed is None or managed["kind"] not in INGRESS_CONNECTORS + EGRESS_CONNECTORS:
            raise NotFoundError(f"Network connector not found for: {value}")
        return Connector(value, managed["kind"])
    if _CUSTOMER_CONNECTOR.fullmatch(rest) is None:
        raise ValidationError(f"Invalid network connector ARN at '{field}': {value}")
    if match["account"] != context.account:
        raise AccessDeniedError(f"User is not authorized to use network connector {value}.")
    # Customer VPC connectors belong to lambda-core, which openmicrovm does not implement.
    raise NotFoundError(f"Network connector not found for: {value}")
