"""The labelling page in a real headless browser (Debian's chromium, driven by Selenium).

`kiln label serve` runs as its own process on a database built here; two labellers label every
pair, one by clicking and one by keys; completions carrying markup must show as inert text; the
server is then killed (SIGKILL) and `kiln label export` must find every vote. A watchdog ends the
browser and the server after WATCHDOG_S, so the test stops by itself.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conftest import kiln
from kiln.serve.label.db import LabelDB

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WATCHDOG_S = 60
ADMIN = "browser-test-admin-key-0123456789"
# Untrusted model output: each line would change the title or set window.__pwned if it ran.
XSS_PROMPT = '<script>document.title = "pwned"; window.__pwned = "prompt"</script> write a link'
XSS_A = '<img src=x onerror="window.__pwned = \'img\'; document.title = \'pwned\'"> see the picture'
XSS_B = '<a href="javascript:window.__pwned = \'link\'">click me</a><script>window.__pwned = "script"</script>'
PAIRS = [(XSS_PROMPT, XSS_A, XSS_B),
         ("def square(x):", "    return x * x", "    return x + x"),
         ("def greet(name):", "    return f'hello {name}'", "    print(name)")]

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no chromium + chromedriver on this machine: install Debian's chromium and chromium-driver "
           "(`make test` does, as root)")


class Watchdog:
    """Kills what it guards (the process groups of the server and of chromedriver with its browser,
    each started in a session of its own) once the deadline passes."""

    def __init__(self, seconds: float) -> None:
        self.guarded: list = []  # Popen objects, or Selenium services (whose process appears on start)
        self.fired = False
        self.timer = threading.Timer(seconds, self.fire)
        self.timer.daemon = True
        self.timer.start()

    def fire(self) -> None:
        self.fired = True
        for thing in self.guarded:
            proc = thing if isinstance(thing, subprocess.Popen) else getattr(thing, "process", None)
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cancel(self) -> None:
        self.timer.cancel()


def start_server(db_path: Path, watchdog: Watchdog) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "kiln", "label", "serve", f"label.db={db_path}", "label.port=0",
           f"label.admin_key={ADMIN}", "label.labellers_per_pair=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)
    watchdog.guarded.append(proc)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 30
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(r"labelling app at (http://127\.0\.0\.1:\d+)/", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise AssertionError(f"kiln label serve did not start: {''.join(seen)}")


def start_browser(profile: Path, watchdog: Watchdog) -> webdriver.Chrome:
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, popen_kw={"start_new_session": True})
    watchdog.guarded.append(service)  # guarded from before it starts: a browser that hangs at start-up is ended too
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(15)
    driver.set_script_timeout(10)
    return driver


def wait_for(driver, condition, what: str, timeout: float = 10):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def showing(driver, pair_id: int) -> dict:
    wait_for(driver, lambda d: text(d, "pair-id") == f"pair {pair_id}", f"pair {pair_id} on the page")
    return {side: text(driver, side) for side in ("prompt", "left", "right")}


def assert_inert(driver) -> None:
    """The XSS pair is on screen: its markup is shown as text, and none of it ran."""
    time.sleep(0.3)  # an injected <img> would have failed to load and fired onerror by now
    assert driver.execute_script("return window.__pwned === undefined")
    assert driver.title == "kiln label"
    assert driver.execute_script("return document.images.length + document.links.length") == 0
    for element_id in ("prompt", "left", "right"):
        assert driver.execute_script(f"return document.getElementById('{element_id}').children.length") == 0
    shown = {text(driver, "left"), text(driver, "right")}
    assert shown == {XSS_A, XSS_B} and text(driver, "prompt") == XSS_PROMPT
    driver.find_element(By.ID, "left").click()  # clicking the would-be link does nothing either
    assert driver.execute_script("return window.__pwned === undefined")


def press(driver, keys: str) -> None:
    ActionChains(driver).send_keys(keys).perform()


def test_two_labellers_label_in_a_real_browser_and_export_what_they_chose(tmp_path):
    db = LabelDB.create(tmp_path / "labels.db")
    db.add_pairs(PAIRS)
    alice, bob = db.invite("alice"), db.invite("bob")
    watchdog = Watchdog(WATCHDOG_S)
    server = driver = None
    try:
        server, url = start_server(db.path, watchdog)
        driver = start_browser(tmp_path / "profile", watchdog)

        # alice clicks.
        driver.get(f"{url}/#join={alice}")
        first = showing(driver, 1)
        assert "#join" not in driver.current_url  # the token left the address bar
        assert text(driver, "who") == "labelling as alice"
        assert text(driver, "progress") == "you: 0 labelled, 3 left · all: 0/6 votes"
        assert_inert(driver)
        alice_1 = first["left"]
        driver.find_element(By.ID, "choose-left").click()
        showing(driver, 2)
        driver.find_element(By.ID, "comment").send_keys("both fine")
        driver.find_element(By.ID, "choose-tie").click()
        third = showing(driver, 3)
        alice_3 = third["right"]
        ActionChains(driver).double_click(driver.find_element(By.ID, "choose-right")).perform()
        wait_for(driver, lambda d: "Nothing left" in text(d, "status"), "alice done")
        assert text(driver, "progress") == "you: 3 labelled, 0 left · all: 3/6 votes"

        # bob uses the keyboard, in a fresh session.
        driver.delete_all_cookies()
        driver.get(f"{url}/#join={bob}")
        shown = showing(driver, 1)
        assert text(driver, "who") == "labelling as bob"
        assert_inert(driver)
        press(driver, "1" if shown["left"] == alice_1 else "2")  # agrees with alice
        shown = showing(driver, 2)
        bob_2 = shown["left"]
        press(driver, "c")
        press(driver, "option 2 is better, terse")  # typed into the comment: no key here votes
        assert driver.switch_to.active_element.get_attribute("id") == "comment"
        press(driver, Keys.ESCAPE)
        assert text(driver, "pair-id") == "pair 2"
        press(driver, "a")  # bob prefers his left one; alice called it a tie: no majority
        shown = showing(driver, 3)
        press(driver, "a" if shown["left"] == alice_3 else "b")  # agrees with alice
        wait_for(driver, lambda d: "Nothing left" in text(d, "status"), "bob done")
        assert text(driver, "progress") == "you: 3 labelled, 0 left · all: 6/6 votes"

        # The admin page, with the admin key; a labeller's cookie alone gets nothing there.
        driver.get(f"{url}/admin")
        wait_for(driver, lambda d: "admin key required" in text(d, "status"), "admin page refused")
        driver.get(f"{url}/admin#key={ADMIN}")
        wait_for(driver, lambda d: "Fleiss' kappa" in text(d, "report"), "admin report")
        report = text(driver, "report")
        assert "votes: 6" in report and "Cohen's kappa alice / bob" in report
        assert "#key" not in driver.current_url
    finally:
        if driver is not None:
            driver.quit()
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)  # a crash: acknowledged votes must all be on disk
            server.wait(10)
        watchdog.cancel()
        if watchdog.fired:
            pytest.fail(f"the browser test ran past {WATCHDOG_S} s and was stopped (the browser or the server hung)")

    with sqlite3.connect(db.path) as con:
        votes = con.execute("SELECT l.name, v.pair_id, v.comment FROM votes v JOIN labellers l ON l.id = v.labeller_id "
                            "ORDER BY l.name, v.pair_id").fetchall()
    assert votes == [("alice", 1, ""), ("alice", 2, "both fine"), ("alice", 3, ""),
                     ("bob", 1, ""), ("bob", 2, "option 2 is better, terse"), ("bob", 3, "")]
    out = tmp_path / "preferences.jsonl"
    assert kiln("label", "export", f"label.db={db.path}", f"label.output={out}", "label.labellers_per_pair=2") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    other = {XSS_A: XSS_B, XSS_B: XSS_A, PAIRS[2][1]: PAIRS[2][2], PAIRS[2][2]: PAIRS[2][1]}
    assert rows == [{"prompt": XSS_PROMPT, "chosen": alice_1, "rejected": other[alice_1]},
                    {"prompt": PAIRS[2][0], "chosen": alice_3, "rejected": other[alice_3]}]
    assert bob_2 in (PAIRS[1][1], PAIRS[1][2])
