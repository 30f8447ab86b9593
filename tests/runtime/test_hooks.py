"""call_hook against a real app in a real sandbox: success, refused, hung, malformed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openmicrovm.runtime import hooks
from openmicrovm.runtime.base import BaseDriver
from tests.runtime.conftest import run
from tests.runtime.helpers import app_spec, http


def test_hook_calls(driver: BaseDriver, app_rootfs: Path) -> None:
    async def scenario() -> None:
        sandbox = await driver.start("microvm-hooks", app_spec(app_rootfs))
        try:
            await http(driver, sandbox)  # listening
            result = await hooks.call_hook(driver, sandbox, 8080, "run", b'{"microvmId":"m-1"}', timeout=30)
            assert result.status == 200
            echoed = json.loads(result.body)
            assert echoed == {
                "hook": "run",
                "body": '{"microvmId":"m-1"}',
                "host": "localhost:8080",
                "content_type": "application/json",
            }
            result = await hooks.call_hook(driver, sandbox, 8080, "resume", None, timeout=30)
            assert result.status == 200 and json.loads(result.body)["content_type"] is None

            with pytest.raises(hooks.HookConnectionRefused, match="port 9999"):
                await hooks.call_hook(driver, sandbox, 9999, "ready", None, timeout=30)
            with pytest.raises(hooks.HookTimeout, match="the hang hook did not answer within 1 s"):
                await hooks.call_hook(driver, sandbox, 8080, "hang", None, timeout=1)
            with pytest.raises(hooks.HookMalformedReply, match="invalid status line"):
                await hooks.call_hook(driver, sandbox, 8080, "garbage", None, timeout=30)
            # The app still serves after all that.
            status, _ = await http(driver, sandbox)
            assert status == 200
        finally:
            await driver.destroy(sandbox)

    run(scenario())


def test_hook_request_shape() -> None:
    request = hooks.build_request(8080, "ready", None)
    assert request == (
        b"POST /aws/lambda-microvms/runtime/v1/ready HTTP/1.1\r\n"
        b"Host: localhost:8080\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    request = hooks.build_request(80, "run", b"{}")
    assert b"Content-Type: application/json\r\n" in request and request.endswith(b"\r\n\r\n{}")
