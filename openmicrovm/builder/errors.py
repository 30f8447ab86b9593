"""Why a build failed, in the words the API reports as a build's and version's `stateReason`.

Artifact and container failures carry one of the reason codes AWS documents (spec §4.6), written as
`"<CODE>: <what was wrong and what to do>"`. Hook failures use the wording recorded on the real
service (`Ready hook check failed: the application returned a client error (HTTP 4xx) response`).
"""

from __future__ import annotations

import errno

# Reason codes documented by AWS (spec §4.6).
S3_ACCESS_DENIED = "S3_ACCESS_DENIED"
S3_NO_SUCH_KEY = "S3_NO_SUCH_KEY"
S3_NO_SUCH_BUCKET = "S3_NO_SUCH_BUCKET"
S3_INVALID_OBJECT = "S3_INVALID_OBJECT"
S3_CROSS_REGION_ACCESS_DENIED = "S3_CROSS_REGION_ACCESS_DENIED"
ARCHIVE_DOCKERFILE_NOT_FOUND = "ARCHIVE_DOCKERFILE_NOT_FOUND"
ARCHIVE_INVALID = "ARCHIVE_INVALID"
CONTAINER_BUILD_FAILED = "CONTAINER_BUILD_FAILED"
DISK_STORAGE_FULL = "DISK_STORAGE_FULL"
INTERNAL_PLATFORM_ERROR = "INTERNAL_PLATFORM_ERROR"

# Failures after the image is built. AWS reports these as free text, not as codes; the codes
# here let callers branch without parsing the text.
READY_HOOK_FAILED = "READY_HOOK_FAILED"
READY_HOOK_TIMEOUT = "READY_HOOK_TIMEOUT"
VALIDATE_HOOK_FAILED = "VALIDATE_HOOK_FAILED"
VALIDATE_HOOK_TIMEOUT = "VALIDATE_HOOK_TIMEOUT"
# Our own additions: AWS has no equivalent because its builds always run on a matching chipset,
# and its snapshot is taken even if the app never listens.
APPLICATION_START_FAILED = "APPLICATION_START_FAILED"
ARCHITECTURE_NOT_SUPPORTED = "ARCHITECTURE_NOT_SUPPORTED"

HOOK_FAILURE_CODES = frozenset(
    {READY_HOOK_FAILED, READY_HOOK_TIMEOUT, VALIDATE_HOOK_FAILED, VALIDATE_HOOK_TIMEOUT}
)


class BuildFailed(Exception):
    """A build ended in FAILED. `state_reason` is the complete text for `stateReason`."""

    def __init__(self, code: str, state_reason: str) -> None:
        super().__init__(state_reason)
        self.code = code
        self.state_reason = state_reason

    @classmethod
    def because(cls, code: str, explanation: str) -> BuildFailed:
        """The usual `"<CODE>: <explanation>"` form."""
        return cls(code, f"{code}: {explanation}")


def disk_full(where: str) -> BuildFailed:
    return BuildFailed.because(
        DISK_STORAGE_FULL,
        f"The build ran out of disk space while {where}. Free space on the server's data and cache "
        "disks, or make the artifact and image smaller.",
    )


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def hook_status_failure(hook: str, status: int) -> BuildFailed:
    """A hook answered with something other than 200 or 503 (spec §4.5 response contract)."""
    if 400 <= status < 500:
        kind = "a client error (HTTP 4xx)"
    elif 500 <= status < 600:
        kind = "a server error (HTTP 5xx)"
    else:
        kind = f"an unexpected status (HTTP {status})"
    code = READY_HOOK_FAILED if hook == "ready" else VALIDATE_HOOK_FAILED
    return BuildFailed(
        code, f"{hook.capitalize()} hook check failed: the application returned {kind} response"
    )


def hook_malformed_failure(hook: str, detail: str) -> BuildFailed:
    code = READY_HOOK_FAILED if hook == "ready" else VALIDATE_HOOK_FAILED
    return BuildFailed(
        code,
        f"{hook.capitalize()} hook check failed: the application returned a malformed HTTP response "
        f"({detail})",
    )


def hook_timeout_failure(hook: str, timeout_seconds: float, port: int, last_seen: str) -> BuildFailed:
    code = READY_HOOK_TIMEOUT if hook == "ready" else VALIDATE_HOOK_TIMEOUT
    setting = f"{hook}TimeoutInSeconds"
    return BuildFailed(
        code,
        f"{hook.capitalize()} hook timed out: the application did not answer "
        f"POST /aws/lambda-microvms/runtime/v1/{hook} on port {port} with HTTP 200 within "
        f"{timeout_seconds:g} seconds ({setting}); last result: {last_seen}. Return 503 while still "
        f"starting, 200 once ready, bind 0.0.0.0:{port}, or raise {setting}.",
    )
