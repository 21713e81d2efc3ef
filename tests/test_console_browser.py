"""The web console in a real browser: Debian's Chromium, headless, driven by selenium through
chromedriver, against a live `eir serve --api`. A person logs in, looks an IMEI up, blocks a
phone and the next ECR for it is answered BLACKLISTED by the same server; watches the traffic
view update in place; rolls the lists back; and the read-only role is refused a change.
Each page is saved as a screenshot in docs/console/ (README shows them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers_console import READ_TOKEN, start_console
from helpers_ops import API_LINE, TOKEN, endpoint
from helpers_process import eir_ok
from helpers_wire import check_all, ecr, open_peer, parse_answer, read_message

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "console"
STOLEN = "35209900176148"  # blacklisted in config/lists/example.csv
FRESH = "35123456789012"  # in no list, until the console blocks it
IMSI = "001010123456789"
BLACKLISTED = 1

pytestmark = pytest.mark.skipif(not (Path(CHROMEDRIVER).exists() and Path(CHROMIUM).exists()),
                                reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1100,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER),
                              options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def wait_for(driver, css: str, text: str | None = None, timeout: float = 10):
    """The element `css` once it is there (and holds `text`)."""
    def found(d):
        elements = d.find_elements(By.CSS_SELECTOR, css)
        if elements and (text is None or text in elements[0].text):
            return elements[0]
        return False
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(found)


def log_in(driver, url: str, token: str, then: str = "/console/") -> None:
    driver.delete_all_cookies()
    driver.get(url + then)
    field = wait_for(driver, "#token")
    field.send_keys(token)
    driver.find_element(By.ID, "login").click()
    wait_for(driver, ".logout")


def test_log_in_look_up_block_and_the_next_ecr_is_blacklisted(browser, eir_server, monkeypatch,
                                                                tmp_path):
    server, url = start_console(eir_server, monkeypatch, tmp_path,
                                console="  refresh_seconds: 1\n")
    browser.set_window_size(1100, 900)
    browser.delete_all_cookies()
    browser.get(url + "/console/")
    wait_for(browser, "#token")
    shot(browser, "login")
    log_in(browser, url, TOKEN)

    # A lookup, by its shareable URL's form.
    browser.find_element(By.ID, "imei").send_keys(STOLEN + "1")
    browser.find_element(By.ID, "imsi").send_keys(IMSI)
    browser.find_element(By.ID, "look-up").click()
    assert wait_for(browser, "#verdict").text == "BLACKLISTED"
    assert "reported stolen" in browser.find_element(By.ID, "reason").text
    assert browser.current_url.endswith(f"/console/lookup?imei={STOLEN}1&imsi={IMSI}")
    shot(browser, "lookup")
    browser.set_window_size(390, 844)  # a phone
    shot(browser, "lookup-phone")
    browser.set_window_size(1100, 900)

    # Block a phone in the local rules; the live server answers the next ECR BLACKLISTED.
    assert check_all(server.address, [(FRESH + "0", IMSI)])[0].experimental_result_code == 5422
    browser.get(url + "/console/rules")
    wait_for(browser, "#add-rule").click()
    wait_for(browser, "#rule-imei").send_keys(FRESH)
    browser.find_element(By.ID, "rule-reason").send_keys("stolen, reported at the shop")
    shot(browser, "rule-form")
    browser.find_element(By.ID, "save-rule").click()
    wait_for(browser, ".done", "Rule added")
    assert FRESH in browser.find_element(By.ID, "rules").text
    shot(browser, "rules")
    answer, = check_all(server.address, [(FRESH + "0", IMSI)])
    assert answer.equipment_status == BLACKLISTED
    browser.get(url + f"/console/lookup?imei={FRESH}0")
    assert wait_for(browser, "#verdict").text == "BLACKLISTED"

    # Peers and traffic: a connected MME, and counts that change without a page reload.
    sock = open_peer(server.address)
    try:
        browser.get(url + "/console/peers")
        wait_for(browser, "#peers", "mme.test")
        blacklisted = int(wait_for(browser, "#verdicts .status-blacklisted + td").text)
        browser.execute_script("window.notReloaded = true")
        sock.sendall(ecr(FRESH + "0", IMSI, session_id="mme.test;9;9", hop_by_hop=99,
                         end_to_end=99))
        assert parse_answer(read_message(sock)).equipment_status == BLACKLISTED
        wait_for(browser, "#verdicts", f"BLACKLISTED {blacklisted + 1}")
        # ...and in the MME's own row: its connection's answers (eir.diameter.peer).
        assert wait_for(browser, "#peers .answered-blacklisted", "1").text == "1"
        assert browser.find_element(By.CSS_SELECTOR, "#peers .answered-unknown").text == "0"
        assert browser.execute_script("return window.notReloaded") is True
        shot(browser, "peers")
    finally:
        sock.close()

    # The read-only role: looks up, is refused any change.
    log_in(browser, url, READ_TOKEN, then="/console/rules")
    assert not browser.find_elements(By.ID, "add-rule")
    browser.get(url + "/console/rules/new")
    assert "read-only role cannot change" in wait_for(browser, ".error").text
    shot(browser, "read-only-refused")
    # A change posted anyway, with the session's own CSRF token, is refused too.
    browser.get(url + "/console/rules")
    wait_for(browser, "h1", "Local rules")
    browser.execute_script("""
        var form = document.createElement("form");
        form.method = "post"; form.action = arguments[0];
        for (var [name, value] of Object.entries({imei: arguments[1], status: "whitelist",
                csrf: document.querySelector(".logout input[name=csrf]").value})) {
            var input = document.createElement("input");
            input.name = name; input.value = value; form.appendChild(input);
        }
        document.body.appendChild(form); form.submit();""",
        url + "/console/rules/add", FRESH)
    wait_for(browser, "h1", "Read-only")
    assert FRESH in (tmp_path / "local.csv").read_text()  # still the admin's blacklist rule
    assert check_all(server.address, [(FRESH + "0", IMSI)])[0].equipment_status == BLACKLISTED


def test_roll_back_in_the_browser(browser, eir_server, monkeypatch, tmp_path):
    store = tmp_path / "store"
    for number, status in enumerate(["blacklist", "greylist"], 1):
        source = tmp_path / f"drop{number}"
        source.mkdir()
        (source / "lists.csv").write_text(f"imei,status,imsi,reason\n"
                                          f"{STOLEN},{status},,registry run {number}\n")
        eir_ok("sync", "--source", str(source), "--store", str(store))
    shutil.rmtree(tmp_path / "drop1")
    monkeypatch.setenv("EIR_API_TOKEN", TOKEN)
    server = eir_server("--store", str(store), "--api", "127.0.0.1:0", "--workers", "1",
                        lists=[])
    url = endpoint(server, API_LINE)
    log_in(browser, url, TOKEN, then="/console/lists")
    assert wait_for(browser, "#in-force").text == "000002"
    shot(browser, "lists")
    browser.find_element(By.ID, "rollback-000001").click()
    wait_for(browser, "#confirm")
    shot(browser, "rollback-confirm")
    browser.find_element(By.ID, "confirm").click()
    wait_for(browser, ".done", "Rolled back")
    assert browser.find_element(By.ID, "in-force").text == "000001"
    assert browser.find_element(By.ID, "pinned").text == "000001"
    answer, = check_all(server.address, [(STOLEN + "0", IMSI)])
    assert answer.equipment_status == BLACKLISTED  # version 000001's verdict
    journal = (store / "journal.jsonl").read_text().splitlines()[-1]
    assert '"act": "rollback"' in journal and "web console, role admin" in journal
