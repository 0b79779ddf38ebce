"""The console in a real Chromium, against real processes: `policycast serve` over HTTPS, Mosquitto,
`policycast bridge` and a real `policycast-agent`. Each test clicks through the console by the words
the operator reads, then reads the result back through the admin API and from the agent's next
document."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.e2e.conftest import PushStack
from tests.support.browser import console_browser, screenshot, signed_in_page
from tests.support.processes import AgentProcess
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("push_broker", ["mosquitto"], indirect=True)]
DOCUMENT_WITHIN_S = 15.0  # a bound on failure: a push agent hears of a change at once


@pytest.fixture
def browser(push_stack: PushStack) -> Iterator[Browser]:
    ca = push_stack.manager.ca
    assert ca is not None, "the console is served over HTTPS"
    with console_browser(ca.certificate_pem) as chromium:
        yield chromium


def _document(agent: AgentProcess, until: Any, what: str) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        agent.applied,
        until=lambda doc: doc is not None and until(doc),
        timeout=DOCUMENT_WITHIN_S,
        what=lambda: f"{what}\n{agent.output()}",
    )
    return found


def _open_group(page: Page, group: str, tab: str) -> None:
    page.get_by_role("navigation", name="Console").get_by_role("link", name="Clients").click()
    page.get_by_role("navigation", name="Groups").get_by_role("link", name=group, exact=True).click()
    page.get_by_role("navigation", name="Group").get_by_role("link", name=tab, exact=True).click()
    expect(page.get_by_role("heading", name=group, exact=True)).to_be_visible()


def test_the_sepm_procedure_sets_a_groups_and_a_locations_communications_settings(
    push_stack: PushStack, browser: Browser
) -> None:
    admin = push_stack.manager.admin
    root = push_stack.manager.root()
    sales = admin.group("Sales", root)["id"]
    admin.post(f"/groups/{root}/locations", {"name": "Office", "conditions": []})
    agent = push_stack.agent("laptop-1", sales)
    try:
        push_stack.wait_transport(agent, "push")
        page = signed_in_page(browser, push_stack.manager.url, push_stack.manager.admin_key)

        # Clients → the group tree → Sales → Policies → uncheck inheritance.
        _open_group(page, "Sales", "Policies")
        inherit = page.get_by_label('Inherit policies and settings from the parent group "My Company"')
        expect(inherit).to_be_checked()
        inherit.uncheck()
        expect(inherit).not_to_be_checked()
        expect(page.get_by_role("button", name="Communications Settings")).to_be_visible()
        assert admin.get(f"/groups/{sales}")["inherit"] is False

        # Location-independent Policies and Settings → Settings → Communications Settings.
        independent = page.get_by_role("region", name="Location-independent Policies and Settings")
        independent.get_by_role("button", name="Communications Settings").click()
        dialog = page.get_by_role("dialog", name="Communications Settings for Sales")
        expect(dialog).to_be_visible()
        screenshot(page, "communications-settings")
        dialog.get_by_label("Download policies and content from the management server").check()
        dialog.get_by_label("Push mode").check()
        dialog.get_by_label("Heartbeat Interval", exact=True).fill("2")
        dialog.get_by_label("Heartbeat Interval unit").select_option("hours")
        dialog.get_by_role("button", name="OK").click()
        expect(dialog).to_be_hidden()
        expect(page.get_by_text("Communications Settings for Sales saved.")).to_be_visible()

        group_settings = admin.get(f"/groups/{sales}/communication")
        assert group_settings["group_id"] == sales
        assert (
            group_settings["mode"],
            group_settings["heartbeat_s"],
            group_settings["download_enabled"],
        ) == (
            "push",
            7200,
            True,
        )
        doc = _document(
            agent, lambda d: d["communication"]["heartbeat_s"] == 7200, "the group's new heartbeat"
        )
        assert doc["group_id"] == sales and doc["communication"]["mode"] == "push"

        # Location-specific Policies and Settings → Default → Tasks → uncheck "Use Group
        # Communications Settings" → "Local - Push" opens the same dialog for the location.
        default = page.get_by_role("article", name="Location: Default")
        default.get_by_text("Tasks").click()
        default.get_by_label("Use Group Communications Settings").uncheck()
        default = page.get_by_role("article", name="Location: Default")
        default.get_by_role("button", name="Local - Push").click()
        dialog = page.get_by_role("dialog", name="Communications Settings for Default")
        expect(dialog).to_be_visible()
        expect(dialog.get_by_label("Heartbeat Interval", exact=True)).to_have_value(
            "2"
        )  # the group's, copied
        dialog.get_by_label("Pull mode").check()
        dialog.get_by_label("Heartbeat Interval", exact=True).fill("30")
        dialog.get_by_label("Heartbeat Interval unit").select_option("minutes")
        dialog.get_by_role("button", name="OK").click()
        expect(dialog).to_be_hidden()
        default = page.get_by_role("article", name="Location: Default")
        expect(default.get_by_role("button", name="Local - Pull")).to_be_visible()
        screenshot(page, "group-policies")

        location_id = admin.default_location(sales)["id"]
        local = admin.get(f"/groups/{sales}/locations/{location_id}/communication")
        assert local["use_group_settings"] is False
        assert (local["effective"]["mode"], local["effective"]["heartbeat_s"]) == ("pull", 1800)
        doc = _document(agent, lambda d: d["communication"]["mode"] == "pull", "the location's pull mode")
        assert doc["communication"]["heartbeat_s"] == 1800 and doc["location_id"] == location_id
    finally:
        assert agent.stop() == 0, agent.output()


def test_the_clients_list_follows_a_change_until_every_client_holds_it(
    push_stack: PushStack, browser: Browser
) -> None:
    admin = push_stack.manager.admin
    root = push_stack.manager.root()
    agents = [push_stack.agent(f"desk-{n}", root) for n in (1, 2)]
    try:
        for agent in agents:
            push_stack.wait_transport(agent, "push")
        page = signed_in_page(browser, push_stack.manager.url, push_stack.manager.admin_key)
        _open_group(page, "My Company", "Clients")
        clients = page.get_by_role("table", name="Clients of My Company")
        for name in ("desk-1", "desk-2"):
            row = clients.get_by_role("row").filter(has=page.get_by_role("rowheader", name=name))
            expect(row).to_contain_text("Online")
            expect(row).to_contain_text("Push")

        target = push_stack.change(root, {"default": "deny"})
        # The list is live: without a reload, each row comes to hold the new serial.
        for name in ("desk-1", "desk-2"):
            row = clients.get_by_role("row").filter(has=page.get_by_role("rowheader", name=name))
            expect(row.locator("td.serial")).to_have_text(f"{target} / {target}")
            expect(row.locator("td.fresh")).to_have_text("No")  # out of date: no
        # ... and the change itself is shown as reaching both, with its convergence times.
        latest = page.get_by_role("table", name="Recent changes").get_by_role("row").nth(1)
        expect(latest).to_contain_text("2 of 2")
        expect(latest).to_contain_text(re.compile(r"\d+\.\d+ s"))
        screenshot(page, "clients")

        # "Update policy now" for one client: it hears it at once on its cmd topic and heartbeats,
        # although its heartbeat interval is minutes away.
        seen_before = admin.agent(agents[0].agent_id)["last_seen"]
        first = clients.get_by_role("row").filter(has=page.get_by_role("rowheader", name="desk-1"))
        first.get_by_role("button", name="Update policy now: desk-1").click()
        expect(page.get_by_text("Update policy now: desk-1 was asked to update.")).to_be_visible()
        wait_for(
            lambda: admin.agent(agents[0].agent_id)["last_seen"],
            until=lambda seen: seen is not None and seen > seen_before,
            timeout=DOCUMENT_WITHIN_S,
            what=lambda: f"desk-1 heartbeating on update now\n{agents[0].output()}",
        )
    finally:
        for agent in agents:
            assert agent.stop() == 0, agent.output()


def test_a_policy_made_in_the_console_and_assigned_per_location_reaches_the_agent(
    push_stack: PushStack, browser: Browser
) -> None:
    admin = push_stack.manager.admin
    root = push_stack.manager.root()
    agent = push_stack.agent("kiosk-1", root)
    try:
        push_stack.wait_transport(agent, "push")
        page = signed_in_page(browser, push_stack.manager.url, push_stack.manager.admin_key)

        # Policies → Add a policy; a body that is not JSON is refused at its field, and nothing is made.
        page.get_by_role("navigation", name="Console").get_by_role("link", name="Policies").click()
        page.get_by_label("Policy name").fill("Kiosk firewall")
        page.get_by_label("Policy type").fill("firewall")
        body = page.get_by_label("Policy body (JSON object)")
        body.fill('{"default": "deny",}')
        page.get_by_role("button", name="Add Policy").click()
        body = page.get_by_label("Policy body (JSON object)")
        expect(body).to_have_attribute("aria-invalid", "true")
        expect(page.get_by_role("alert")).to_contain_text("line 1")
        assert admin.get("/policies") == []
        body.fill('{"default": "deny"}')
        page.get_by_role("button", name="Add Policy").click()
        expect(page.get_by_role("link", name="Kiosk firewall")).to_be_visible()
        screenshot(page, "policies")
        (policy,) = admin.get("/policies")
        assert (policy["name"], policy["type"], policy["body"]) == (
            "Kiosk firewall",
            "firewall",
            {"default": "deny"},
        )

        # Clients → My Company → Policies → the Default location's firewall policy → Assign.
        _open_group(page, "My Company", "Policies")
        default = page.get_by_role("article", name="Location: Default")
        default.get_by_label("firewall policy of Default", exact=True).select_option(label="Kiosk firewall")
        default.get_by_role("button", name="Assign the firewall policy of Default").click()
        expect(page.get_by_text("firewall policy assignment saved.")).to_be_visible()
        doc = _document(agent, lambda d: "firewall" in d["policies"], "the assigned policy")
        assert doc["policies"]["firewall"]["body"] == {"default": "deny"}
        assert doc["policies"]["firewall"]["scope"] != "group"

        # Edit it: every agent using it gets the new body.
        page.get_by_role("navigation", name="Console").get_by_role("link", name="Policies").click()
        page.get_by_role("link", name="Kiosk firewall").click()
        page.get_by_label("Policy body (JSON object)").fill('{"default": "allow"}')
        page.get_by_role("button", name="Save Policy").click()
        expect(page.get_by_text("Policy saved.")).to_be_visible()
        doc = _document(
            agent, lambda d: d["policies"].get("firewall", {}).get("body") == {"default": "allow"}, "the edit"
        )
        assert doc["policies"]["firewall"]["version"] == 2
    finally:
        assert agent.stop() == 0, agent.output()


def test_a_viewer_reads_every_page_and_is_offered_no_change(push_stack: PushStack, browser: Browser) -> None:
    admin = push_stack.manager.admin
    root = push_stack.manager.root()
    admin.patch(f"/groups/{admin.group('Branch', root)['id']}", {"inherit": False})
    viewer = admin.post("/api-keys", {"name": "helpdesk", "role": "viewer"})
    page = signed_in_page(browser, push_stack.manager.url, viewer["key"])
    expect(page.get_by_text("viewer", exact=True)).to_be_visible()
    _open_group(page, "Branch", "Policies")
    expect(
        page.get_by_text('Does not inherit policies and settings from the parent group "My Company"')
    ).to_be_visible()
    pages = ["Clients", "Policies", "Content", "Logs", "Audit"]
    for name in pages:
        page.get_by_role("navigation", name="Console").get_by_role("link", name=name, exact=True).click()
        main = page.get_by_role("main")
        expect(main).to_be_visible()
        # Read-only: the only buttons are filters and navigation, never one that changes state.
        for button in main.get_by_role("button").all():
            assert button.inner_text() in ("Show Logs", "Show Audit Trail"), (
                name,
                button.inner_text(),
            )
        assert main.get_by_role("checkbox").count() == 0 and main.locator("textarea").count() == 0
        if name == "Logs":
            screenshot(page, "logs")
        if name == "Audit":
            screenshot(page, "audit")
    expect(page.get_by_role("navigation", name="Console").get_by_role("link", name="API Keys")).to_have_count(
        0
    )
