"""Pages and fragments from the Jinja2 templates, with the headers every console answer carries, and
the console's errors shown in the page (never JSON, never a traceback)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from api.console.deps import ConsoleRefusal, SignInRequired
from manager_db.models import as_utc, utcnow

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
SECURITY_HEADERS = {
    # No inline script or style anywhere: htmx and the console's own script are files of ours.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def duration(seconds: int | None) -> str:
    """300 → "5 minutes", 7200 → "2 hours", 90 → "90 seconds"."""
    if seconds is None:
        return ""
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def ago(moment: datetime | None) -> str:
    """A moment as a person reads it in a live list: "12 s ago", "3 min ago", or the date."""
    moment = as_utc(moment)
    if moment is None:
        return "never"
    seconds = int((utcnow() - moment).total_seconds())
    seconds = max(seconds, 0)
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 90 * 60:
        return f"{seconds // 60} min ago"
    if seconds < 36 * 3600:
        return f"{seconds // 3600} h ago"
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def seconds(value: float | None) -> str:
    """A convergence time: "0.42 s", "12.3 s", "4 min 5 s"; a dash when nothing was measured."""
    if value is None:
        return "\u2013"  # an en dash
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.1f} s"
    minutes, rest = divmod(round(value), 60)
    return f"{minutes} min {rest} s"


def when(moment: datetime | None) -> str:
    moment = as_utc(moment)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


TEMPLATES.env.filters.update(duration=duration, ago=ago, when=when, seconds=seconds)


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any],
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    response = TEMPLATES.TemplateResponse(request, template, dict(context), status_code=status_code)
    response.headers.update({**SECURITY_HEADERS, **(headers or {})})
    return response


def sign_in_again(request: Request, detail: str) -> Response:
    """To the sign-in page, and back to where the operator was afterwards."""
    target = "/console/signin?next=" + quote(request.url.path, safe="/")
    if is_htmx(request):
        return Response(status_code=200, headers={"HX-Redirect": target, **SECURITY_HEADERS})
    return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)


def refusal_page(request: Request, status_code: int, detail: str) -> Response:
    """An error as the console shows it: in the page's message area for a live request, else a page."""
    if is_htmx(request):
        return render(
            request,
            "_message.html",
            {"level": "error", "message": detail},
            status_code=status_code,
            headers={"HX-Retarget": "#messages", "HX-Reswap": "innerHTML"},
        )
    return render(
        request, "error.html", {"status_code": status_code, "error_message": detail}, status_code=status_code
    )


async def console_refusal(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsoleRefusal)
    if isinstance(exc, SignInRequired):
        return sign_in_again(request, exc.detail)
    return refusal_page(request, exc.status_code, exc.detail)
