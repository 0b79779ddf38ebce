"""A real Chromium for the console's tests: Debian's `/usr/bin/chromium`, driven by Playwright.

Playwright's own browsers are never downloaded: the tests launch the system Chromium (`make test`
installs the `chromium` package when it is missing and it runs as root). The browser trusts exactly the
manager's CA, by its public key (`--ignore-certificate-errors-spki-list`), as an agent pins it; it does
not turn certificate checking off.

- `chromium_path()`: the browser, or a test failure that says how to install it (never a skip).
- `console_browser(ca_pem)`: a Chromium that trusts that CA, closed afterwards.
- `signed_in_page(browser, url, key)`: a fresh context (its own cookies) signed in to the console.
- `screenshot(page, name)`: saves the page under `$POLICYCAST_SCREENSHOTS` when it is set (how the
  pictures in docs/screenshots are made), and does nothing otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from playwright.sync_api import Browser, Page, expect, sync_playwright

CHROMIUM = Path(os.environ.get("POLICYCAST_TEST_CHROMIUM", "/usr/bin/chromium"))
VIEWPORT = {"width": 1360, "height": 900}
expect.set_options(timeout=15_000)  # a bound on failure only: each expectation returns when it holds


def chromium_path() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"the console's tests need Chromium at {CHROMIUM}: install Debian's package "
            "('sudo apt-get install -y chromium'; `make test` does it when run as root), "
            "or point POLICYCAST_TEST_CHROMIUM at another Chromium",
            pytrace=False,
        )
    return CHROMIUM


def spki_sha256(certificate_pem: bytes) -> str:
    """Base64 SHA-256 of the certificate's SubjectPublicKeyInfo, as Chromium's flag takes it."""
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@contextmanager
def console_browser(ca_pem: bytes) -> Iterator[Browser]:
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(executable),
            args=[f"--ignore-certificate-errors-spki-list={spki_sha256(ca_pem)}"],
        )
        try:
            yield browser
        finally:
            browser.close()


def signed_in_page(browser: Browser, url: str, key: str) -> Page:
    """A new context and page, signed in with `key` through the sign-in form, on the Clients page."""
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.goto(f"{url}/console/")
    expect(page.get_by_role("heading", name="Sign in to Policycast Manager")).to_be_visible()
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign In").click()
    expect(page.get_by_role("heading", name="Clients")).to_be_visible()
    return page


def screenshot(page: Page, name: str) -> None:
    folder = os.environ.get("POLICYCAST_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)
