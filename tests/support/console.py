"""The operator's console as tests use it: sign in with an API key, read what a page shows.

- `signed_in(client, key)` signs the client in (the session cookie is Secure: the client's `base_url`
  must be `https://...`) and returns the session's CSRF token, which every console form carries.
- `write_controls(html)`: what on a page could change something (a viewer's pages have none).
- `field_error(html, field_id)`: the error shown at a field, as the console marks it.
- `page_message(html)`: what the page's message area says.
"""

from __future__ import annotations

import re
from html import unescape
from html.parser import HTMLParser

import httpx

_SIGNIN_TOKEN = re.compile(r'name="signin_token" value="([^"]*)"')
_CSRF_TOKEN = re.compile(r'data-csrf-token="([^"]*)"')


def signed_in(client: httpx.Client, key: str) -> str:
    """Sign in with `key` as the sign-in page does; the CSRF token of the session it opened."""
    page = client.get("/console/signin")
    assert page.status_code == 200, page.text
    found = _SIGNIN_TOKEN.search(page.text)
    assert found, "the sign-in page carries a signin_token"
    answer = client.post(
        "/console/signin",
        data={"api_key": key, "signin_token": unescape(found.group(1)), "next": "/console/clients"},
        follow_redirects=True,
    )
    assert answer.status_code == 200, f"sign-in refused: {answer.status_code} {answer.text}"
    assert answer.url.path == "/console/clients", answer.url
    token = _CSRF_TOKEN.search(answer.text)
    assert token, "a signed-in page carries data-csrf-token"
    return unescape(token.group(1))


class _Controls(HTMLParser):
    """The write controls of a page: forms that POST (or htmx attributes that write), and buttons or
    text areas outside a form that only reads (a filter form's GET). Signing out is no write."""

    WRITES = ("hx-post", "hx-put", "hx-patch", "hx-delete")

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._form_reads: list[bool] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        writes = any(w in named for w in self.WRITES)
        if tag == "form":
            reads = (named.get("method") or "get").lower() == "get" and not writes
            harmless = reads or named.get("action") == "/console/signout"
            self._form_reads.append(harmless)
            if not harmless:
                self.found.append(f"<form {named}>")
            return
        in_reading_form = bool(self._form_reads) and self._form_reads[-1]
        if writes or (tag in ("button", "textarea") and not in_reading_form):
            self.found.append(f"<{tag} {named}>")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self._form_reads:
            self._form_reads.pop()


def write_controls(html: str) -> list[str]:
    """Every control on the page that could change something (none for a viewer)."""
    parser = _Controls()
    parser.feed(html)
    return parser.found


def field_error(html: str, field_id: str) -> str | None:
    """The error shown at the field `field_id` (aria-invalid, aria-describedby naming a role="alert"
    paragraph), or None if the field shows none. Fails the test if the field is not on the page."""
    tag = re.search(rf'<(?:input|textarea|select)\b[^>]*\bid="{re.escape(field_id)}"[^>]*>', html)
    assert tag, f"no field {field_id!r} on the page"
    if 'aria-invalid="true"' not in tag.group(0):
        return None
    assert f'aria-describedby="{field_id}-error"' in tag.group(0), tag.group(0)
    message = re.search(
        rf'<p id="{re.escape(field_id)}-error" class="field-error" role="alert">(.*?)</p>', html, re.S
    )
    assert message, f"field {field_id!r} is marked invalid but shows no message"
    return unescape(message.group(1))


def page_message(html: str) -> str | None:
    """The message the page shows in its message area (`_message.html`), if any."""
    found = re.search(r'<p class="message message-\w+"[^>]*>(.*?)</p>', html, re.S)
    return unescape(found.group(1)) if found else None
