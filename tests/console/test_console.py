"""The web console in a real browser (Debian's Chromium through Playwright) against the real
server: deploy the sample app by upload, watch its build, run it, use its terminal, suspend and
resume it; API errors shown as the API wrote them; SigV4 sign-in; and what a page, a log line or
another account could try against it.

Screenshots of the main pages go to the test run's output dir (tests/console/conftest.py)."""

from __future__ import annotations

import re
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from playwright.sync_api import Page, expect

from tests.console.conftest import save_screenshot
from tests.support.images import SAMPLE_APP, image_request, upload, zip_files
from tests.support.moto import MotoServer
from tests.support.server import DatabaseBackend, ServerProcess

BUILD_SECONDS = 300
SETTLE_MS = 60_000
ALICE = {
    "access_key_id": "AKIDCONSOLEALICE",
    "secret_access_key": "alice-console-secret",
    "account_id": "111111111111",
}
BOB = {
    "access_key_id": "AKIDCONSOLEBOB",
    "secret_access_key": "bob-console-secret",
    "account_id": "222222222222",
}


@pytest.fixture(scope="module")
def console_server(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[ServerProcess]:
    with database_backend.server(tmp_path_factory.mktemp("console"), env=moto.environment()) as server:
        server.start()
        yield server


def open_console(page: Page, server: ServerProcess, view: str = "#/microvms") -> None:
    page.goto(f"{server.url}/console/{view}")


def test_deploy_run_terminal_suspend_resume(page: Page, console_server: ServerProcess) -> None:
    name = f"console-{uuid.uuid4().hex[:6]}"
    # Offline by design: every request the pages make goes to this server or a MicroVM endpoint.
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(urllib.parse.urlsplit(request.url).hostname or request.url))
    open_console(page, console_server, "#/deploy")
    page.get_by_label("Image name").fill(name)
    page.locator("input[name=folder]").set_input_files(str(SAMPLE_APP))
    expect(page.get_by_text(re.compile(r"Folder: \d+ files"))).to_be_visible()
    page.get_by_label("Minimum memory").fill("512")
    save_screenshot(page, "deploy")
    page.get_by_role("button", name="Deploy").click()

    # The image's page follows the build: its log opens by itself and fills while it runs.
    page.wait_for_url(re.compile(r"#/images/arn"))
    version = page.locator("section[data-version='1.0']")
    expect(version.locator("h2 .state")).to_have_text("SUCCESSFUL", timeout=BUILD_SECONDS * 1000)
    expect(page.locator("dl.fields .state").first).to_have_text("CREATED")
    build_log = page.locator(".build-log .log").first
    expect(build_log).to_contain_text("COPY app.py")
    for field in ("baseImageVersion", "createdAt", "updatedAt", "codeArtifact", "hooks"):
        expect(version.locator("dt", has_text=re.compile(f"^{field}$"))).to_be_visible()
    expect(version.get_by_text("X86_64", exact=True)).to_be_visible()
    save_screenshot(page, "image")

    image_arn = urllib.parse.unquote(page.url.split("#/images/", 1)[1])
    page.get_by_role("link", name="MicroVMs", exact=True).click()
    page.locator("select[name=image]").select_option(value=image_arn)
    page.get_by_label("Run hook payload").fill("hello from the console")
    page.get_by_role("button", name="Run", exact=True).click()
    page.locator(".ok a").click()
    expect(page.locator("dl.fields .state").first).to_have_text("RUNNING", timeout=SETTLE_MS)
    expect(page.locator(".log").first).to_contain_text("state: RUNNING")
    # Charts are sampled from /metrics while the page is open.
    expect(page.locator(".chart").first.locator(".value")).to_contain_text("MiB", timeout=SETTLE_MS)

    # A tab on the endpoint: signed in by a fresh token, which then leaves the address bar.
    with page.context.expect_page() as opened:
        page.get_by_role("button", name="Open endpoint").click()
    tab = opened.value
    tab.wait_for_url(re.compile(r"^http://[0-9a-f-]+\.lambda-microvm\.[a-z0-9-]+\.localhost:\d+/$"))
    expect(tab.locator("body")).to_contain_text('"payload": "hello from the console"')
    save_screenshot(tab, "endpoint-tab")
    tab.close()

    page.get_by_role("button", name="Open terminal").click()
    rows = page.locator("#terminal .xterm-rows > div")
    expect(page.get_by_role("status").filter(has_text="open")).to_be_visible(timeout=SETTLE_MS)
    expect(rows.filter(has_text="#").first).to_be_visible()  # the shell's prompt
    # The quotes keep the typed command itself from reading "hello".
    page.keyboard.type("echo hel''lo\n")
    expect(rows.filter(has_text=re.compile(r"^hello\s*$"))).to_have_count(1)
    save_screenshot(page, "microvm")

    page.get_by_role("button", name="Suspend").click()
    expect(page.locator("dl.fields .state").first).to_have_text("SUSPENDED", timeout=SETTLE_MS)
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("dl.fields .state").first).to_have_text("RUNNING", timeout=SETTLE_MS)

    page.get_by_role("link", name="MicroVMs", exact=True).click()
    expect(page.locator("table[aria-label=MicroVMs] tbody tr").first).to_be_visible()
    save_screenshot(page, "microvms")
    # On a phone's width the list becomes one card per MicroVM: nothing runs off the side.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    save_screenshot(page, "microvms-phone")
    page.set_viewport_size({"width": 1280, "height": 800})
    row = page.locator("tr", has_text=name)
    # The details ListMicrovms lacks come from a GetMicrovm once the row is on screen.
    expect(row.locator("td[data-label=Endpoint]")).to_contain_text(".lambda-microvm.")
    row.get_by_role("button", name="Terminate").click()
    page.get_by_label("Show terminated").check()
    expect(row.locator(".state")).to_have_text("TERMINATED", timeout=SETTLE_MS)
    assert {host for host in hosts if host != "127.0.0.1" and not host.endswith(".localhost")} == set()


def test_the_console_works_from_the_keyboard(page: Page, console_server: ServerProcess) -> None:
    open_console(page, console_server)
    expect(page.get_by_role("heading", name="MicroVMs")).to_be_visible()
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")  # to the content, and the route stays
    expect(page.locator("main")).to_be_focused()
    expect(page.get_by_role("heading", name="MicroVMs")).to_be_visible()
    page.get_by_role("button", name="Run a MicroVM").press("Enter")
    expect(page.locator("#run select, #run input").first).to_be_focused()
    # Back from the content, the header's last link: Enter follows it, typing fills the fields.
    page.locator("main").focus()
    page.keyboard.press("Shift+Tab")
    expect(page.get_by_role("link", name="Deploy", exact=True)).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Deploy an image")).to_be_visible()
    page.get_by_label("Image name").focus()
    page.keyboard.type("typed-name")
    expect(page.get_by_label("Image name")).to_have_value("typed-name")
    # Submitting without code says what is missing instead of doing nothing.
    page.get_by_role("button", name="Deploy").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("Choose a folder with a Dockerfile")


def test_an_api_error_is_shown_as_the_api_wrote_it(
    page: Page, console_server: ServerProcess, moto: MotoServer
) -> None:
    bad_role = "not-a-role-arn"
    open_console(page, console_server, "#/deploy")
    page.get_by_label("Image name").fill(f"refused-{uuid.uuid4().hex[:6]}")
    page.locator("input[name=zip]").set_input_files(
        files=[
            {
                "name": "app.zip",
                "mimeType": "application/zip",
                "buffer": zip_files({"Dockerfile": "FROM scratch\n"}),
            }
        ]
    )
    page.get_by_label("Build role ARN").fill(bad_role)
    page.get_by_role("button", name="Deploy").click()
    shown = page.get_by_role("alert")
    expect(shown.locator(".error-code")).to_have_text("ValidationException")

    # boto3, sent the same member, gets the very message the page shows.
    client = console_server.client(client_side_validation=False)
    with pytest.raises(ClientError) as refused:
        client.create_microvm_image(**image_request("refused", upload(moto, b"PK"), buildRoleArn=bad_role))
    expect(shown.locator(".error-message")).to_have_text(refused.value.response["Error"]["Message"])
    save_screenshot(page, "api-error")


@pytest.fixture
def keyed_server(make_server: Any) -> ServerProcess:
    return make_server({"access_keys": [ALICE, BOB]})


def sign_in(page: Page, key: dict[str, str]) -> None:
    page.get_by_label("Access key ID").fill(key["access_key_id"])
    page.get_by_label("Secret access key").fill(key["secret_access_key"])
    page.get_by_role("button", name="Sign in").click()


def test_sigv4_sign_in_signs_every_call_in_the_browser(page: Page, keyed_server: ServerProcess) -> None:
    alice = keyed_server.client(key=ALICE["access_key_id"], secret=ALICE["secret_access_key"])
    # A description with markup: the page must show it as text, never as an element.
    markup = '<img src=x onerror="document.title=1">'
    arn = alice.create_microvm_image(
        **image_request(
            f"alice-{uuid.uuid4().hex[:6]}", "s3://no-such-bucket-openmicrovm/a.zip", description=markup
        )
    )["imageArn"]

    open_console(page, keyed_server, "#/images")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    save_screenshot(page, "sign-in")
    sign_in(page, {**ALICE, "secret_access_key": "not-alice-secret"})
    expect(page.get_by_role("alert").locator(".error-code")).to_have_text(
        re.compile("Signature|Unrecognized")
    )

    sign_in(page, ALICE)
    expect(page.get_by_role("heading", name="Images")).to_be_visible()
    expect(page.locator("#identity")).to_contain_text(ALICE["access_key_id"])
    # The image page asks for the image by its ARN in the path: a signed, percent-encoded path.
    page.get_by_role("link", name=arn.rsplit(":", 1)[1]).click()
    version = page.locator("section[data-version='1.0']")
    expect(version.locator("h2 .state")).to_have_text("FAILED", timeout=SETTLE_MS)
    expect(version.get_by_text(markup, exact=True)).to_be_visible()
    assert page.locator("main img").count() == 0
    assert page.title() != "1"

    # The keys live in this tab's session storage: a reload keeps them, another account sees its own.
    page.reload()
    expect(page.get_by_role("heading", name=arn.rsplit(":", 1)[1])).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, BOB)
    page.goto(f"{keyed_server.url}/console/#/images")
    expect(page.get_by_text("No images yet")).to_be_visible()


def test_the_console_cannot_be_framed_or_scripted_from_elsewhere(console_server: ServerProcess) -> None:
    from tests.support.http import raw_request

    page = raw_request(
        console_server.port, "GET", "/console/", headers={"Host": f"127.0.0.1:{console_server.port}"}
    )
    assert page.status == 200
    policy = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    # Another site's page, a rebinding DNS name, and paths out of the static dir are all refused.
    assert (
        raw_request(console_server.port, "GET", "/console/", headers={"Host": "evil.example"}).status == 421
    )
    framed = raw_request(
        console_server.port,
        "GET",
        "/console/app.js",
        headers={"Host": f"127.0.0.1:{console_server.port}", "Sec-Fetch-Site": "cross-site"},
    )
    assert framed.status == 403
    for path in (
        "/console/../server.py",
        "/console/%2e%2e/route.py",
        "/console/vendor/../route.py",
        "/console/vendor/xterm/../../x",
    ):
        assert raw_request(console_server.port, "GET", path).status == 404, path
