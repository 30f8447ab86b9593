"""Domain errors. Each carries the AWS error code it is answered with; the API layer finds the
HTTP status and the other members of that error in the botocore model."""

from __future__ import annotations


class ServiceError(Exception):
    code = "InternalServerException"

    def __init__(self, message: str, **members: object) -> None:
        super().__init__(message)
        self.message = message
        self.members = members


class ValidationError(ServiceError):
    code = "ValidationException"


class NotFoundError(ServiceError):
    code = "ResourceNotFoundException"


class ConflictError(ServiceError):
    code = "ConflictException"


class AccessDeniedError(ServiceError):
    code = "AccessDeniedException"


class QuotaExceededError(ServiceError):
    code = "ServiceQuotaExceededException"


class InsufficientCapacityError(ServiceError):
    code = "InsufficientCapacityException"


class ThrottlingError(ServiceError):
    code = "ThrottlingException"


class InvalidParameterValueError(ServiceError):
    """The classic Lambda error of the three tags operations."""

    code = "InvalidParameterValueException"
