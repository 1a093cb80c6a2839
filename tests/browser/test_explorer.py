"""The feed explorer and the API docs in a real browser, against a real worker, feed builder,
API, broker and Redis."""

from __future__ import annotations

import time

import httpx
import msgspec
import pytest
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from infra.embedded import free_port
from schemas.keys import RedisKeys
from stream.producer import InteractionProducer, ItemPublisher
from stream.simulator import UserSimulator
from tests.browser.conftest import console_errors, screenshot
from tests.conftest import wait_for

EVENTS = 2000


def _feed(client, keys, user):
    raw = client.get(keys.feed(user))
    return msgspec.json.decode(raw) if raw else None


def until(driver, timeout_s: float):
    """WebDriverWait whose timeout says what the page showed (status line, console errors)."""
    # lists are re-rendered while polled: a stale element means "look again"
    wait = WebDriverWait(driver, timeout_s, ignored_exceptions=(StaleElementReferenceException,))

    class _Until:
        def until(self, condition):
            try:
                return wait.until(condition)
            except TimeoutException:
                status = driver.find_elements(By.ID, "status")
                pytest.fail(f"page condition not met in {timeout_s} s at {driver.current_url}; "
                            f"status: {status[0].text if status else None!r}; console: "
                            f"{console_errors(driver)}; main: "
                            f"{driver.find_element(By.TAG_NAME, 'body').text[:1500]}")

    return _Until()


def _listed(driver, list_id: str) -> list[str]:
    return [row.get_attribute("data-item")
            for row in driver.find_elements(By.CSS_SELECTOR, f"#{list_id} li[data-item]")]


@pytest.fixture
def live(settings, spawn, redis_client):
    """Worker + feed builder + API over simulated traffic with item titles; (url, user with
    the most events, keys)."""
    keys = RedisKeys(settings.key_prefix)
    worker = spawn(["worker", "--loglevel", "warn"], settings,
                   STREAMREC_WORKER_REPORT_INTERVAL_S="1")
    spawn(["feeds"], settings)
    port = free_port()
    api = spawn(["api", "--port", str(port), "--loglevel", "warning"], settings)
    sim = UserSimulator(40, 200, seed=5)
    now = time.time()
    descriptions = [msgspec.structs.replace(r, title=f"Film number {r.item_id[1:]}")
                    for r in sim.item_descriptions(now - 3 * EVENTS)]
    with ItemPublisher(settings.kafka_bootstrap, settings.topic_items) as publisher:
        publisher.send_many(descriptions)
        publisher.flush()
    events = list(sim.events(EVENTS, now - EVENTS * 2, events_per_s=0.5))
    with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions) as producer:
        producer.send_many(events)
        producer.flush()
    counts: dict[str, int] = {}
    for e in events:
        counts[e.user_id] = counts.get(e.user_id, 0) + 1
    user = max(counts, key=counts.get)
    wait_for(lambda: int(redis_client.hget(keys.stats, "events_applied") or 0) >= EVENTS,
             90, "events applied", proc=worker)
    wait_for(lambda: _feed(redis_client, keys, user), 30, "the user's stored feed")
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(f"{url}/readyz"), 30, "API ready", proc=api)
    return url, user, keys, events


def test_explorer_shows_the_stored_feed_with_reasons_and_a_click_changes_it(
        live, browser, redis_client):
    url, user, keys, events = live
    browser.get(f"{url}/")  # the root leads to the explorer
    until(browser, 20).until(  # users with recent activity, listed at start
        lambda d: d.find_elements(By.CSS_SELECTOR, "#users button"))
    browser.find_element(By.ID, "user-prefix").send_keys(user)  # find the user by id
    browser.find_element(By.CSS_SELECTOR, "#user-search button").click()
    until(browser, 20).until(lambda d: user in [
        b.text for b in d.find_elements(By.CSS_SELECTOR, "#users button")])
    browser.find_element(By.XPATH, f"//ul[@id='users']//button[text()='{user}']").click()
    until(browser, 20).until(lambda d: len(_listed(d, "stored")) >= 5
                                     and _listed(d, "fresh"))
    stored = _feed(redis_client, keys, user)
    assert _listed(browser, "stored") == [i["item_id"] for i in stored["items"]]
    rows = browser.find_elements(By.CSS_SELECTOR, "#stored li")
    assert all(row.find_element(By.CLASS_NAME, "why").text for row in rows)  # a reason each
    assert "Film number" in browser.find_element(By.ID, "stored").text  # titles, not only ids
    mine = [e.item_id for e in events if e.user_id == user]
    assert _listed(browser, "history")[0] == mine[-1]
    assert _listed(browser, "trending")
    # live figures from the worker's reports and the log (refreshed every 3 s)
    until(browser, 20).until(
        lambda d: d.find_element(By.ID, "fig-applied").text.replace(",", "").isdigit()
        and int(d.find_element(By.ID, "fig-applied").text.replace(",", "")) >= EVENTS)
    assert browser.find_element(By.ID, "fig-workers").text == "1"
    assert browser.find_element(By.ID, "fig-lag").text == "0"
    assert browser.find_element(By.ID, "fig-fresh").text.endswith("ms")

    clicked = rows[0].get_attribute("data-item")
    rows[0].find_element(By.CSS_SELECTOR, "button[data-action='click']").click()
    until(browser, 40).until(
        lambda d: "feed rebuilt" in d.find_element(By.ID, "status").text
        or "error" in d.find_element(By.ID, "status").get_attribute("class"))
    assert "feed rebuilt" in browser.find_element(By.ID, "status").text
    rebuilt = _feed(redis_client, keys, user)
    assert rebuilt["recommendation_id"] != stored["recommendation_id"]
    assert clicked not in [i["item_id"] for i in rebuilt["items"]]  # seen-filter
    assert _listed(browser, "stored") == [i["item_id"] for i in rebuilt["items"]]
    assert _listed(browser, "history")[0] == clicked
    assert browser.find_elements(By.CSS_SELECTOR, "#stored li.new")  # changes are marked

    browser.find_element(By.CSS_SELECTOR, "#fresh li button:not([data-action])").click()
    until(browser, 20).until(lambda d: d.find_element(By.ID, "similar-of").text != "—")
    assert console_errors(browser) == []
    screenshot(browser, "explorer")


def test_api_docs_render_offline(live, browser):
    url = live[0]
    browser.get(f"{url}/docs")
    until(browser, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"))
    assert "streamrec" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
    until(browser, 10).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 10)
    scripts = [s.get_attribute("src") for s in browser.find_elements(By.TAG_NAME, "script")]
    assert all(src.startswith(url) for src in scripts if src)  # nothing from a CDN
    assert console_errors(browser) == []
    screenshot(browser, "api-docs")


def test_with_api_keys_the_page_asks_for_one_and_then_reads(settings, spawn, browser):
    port = free_port()
    api = spawn(["api", "--port", str(port), "--loglevel", "warning"], settings,
                STREAMREC_API_KEYS="front-end-key-0123456789")
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(f"{url}/healthz"), 30, "API up", proc=api)
    browser.get(f"{url}/explorer/")
    until(browser, 20).until(
        lambda d: d.find_element(By.ID, "fig-rate").text == "stats unavailable")
    assert "401" in browser.find_element(By.ID, "fig-rate").get_attribute("title")
    browser.get_log("browser")  # the refused reads are expected console errors
    browser.find_element(By.ID, "api-key").send_keys("front-end-key-0123456789\n")
    browser.find_element(By.ID, "user-prefix").click()  # blur: the key is taken
    until(browser, 20).until(
        lambda d: d.find_element(By.ID, "fig-applied").text == "0")
    assert browser.find_element(By.ID, "fig-workers").text == "0"


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
