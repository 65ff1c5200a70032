"""serve.py's chat page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
type a message, watch the reply stream in, send a second turn and check the server got the whole history;
"New chat" in the middle of a reply, and a stream cut off before its end."""
import os
import shutil
import socket
import tempfile
import threading
import time
from types import SimpleNamespace

import pytest

from sample import Engine, generate, load
from serve import EngineLoop, make_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

try:
    import selenium  # noqa: F401

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    reason = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)" if missing else ""
except ImportError:
    reason = "selenium is not installed (pip install selenium)"
pytestmark = pytest.mark.skipif(bool(reason), reason=reason)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1100,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def served(tiny_model_dir):
    """A server whose engine takes at least `pace[0]` seconds a step, so that the page visibly streams."""
    model, tokenizer = load(tiny_model_dir)
    stop_ids = tokenizer.stop_ids
    engine = Engine(model, 4, stop_ids=stop_ids, vocab_size=tokenizer.vocab_size)
    loop = EngineLoop(engine, tokenizer).start()
    step, pace = engine.step, [0.005]

    def paced_step():
        time.sleep(pace[0])
        step()

    engine.step = paced_step
    server = make_server(loop, port=0, model_name="tiny", log_requests=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def greedy_reply(messages, max_tokens):
        ids = tokenizer.render_chat(messages, add_generation_prompt=True)[0]
        tokens = generate(model, [ids], max_tokens, temperature=0.0, stop_ids=stop_ids)[0]
        return tokenizer.decode([t for t in tokens if t not in stop_ids]), len(ids)

    yield SimpleNamespace(server=server, loop=loop, pace=pace, greedy_reply=greedy_reply,
                          url=f"http://127.0.0.1:{server.server_address[1]}/")
    server.shutdown()
    server.server_close()
    loop.stop()


def open_page(browser, served, settings):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(served.url)
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
    for field, value in settings.items():
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)


def say(browser, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def texts(browser, selector):
    """The text of each element the selector finds, read in one go (the page may replace them meanwhile)."""
    return browser.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)",
                                  selector)


def test_chat_page_streams_and_keeps_history(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    loop, system = served.loop, "You are terse."
    open_page(browser, served, {"system": system, "temperature": "0", "max_tokens": "24"})
    # count the updates of the reply bubble: a streamed reply changes many times
    browser.execute_script("""
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(document.getElementById('messages'),
            {childList: true, characterData: true, subtree: true});""")
    history = [{"role": "system", "content": system}]
    for turn, question in enumerate(["Hello, world!", "What is 7 + 8?"]):
        updates_before = browser.execute_script("return window.updates")
        prompt_tokens_before = loop.stats()["prompt_tokens"]
        say(browser, question)
        done = (By.CSS_SELECTOR, ".assistant[data-done]")
        WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(*done)) == turn + 1)
        reply = texts(browser, ".msg.assistant")[turn]
        history.append({"role": "user", "content": question})
        expected, prompt_tokens = served.greedy_reply(history, 24)
        assert reply == expected and len(reply) > 0
        assert browser.execute_script("return window.updates") - updates_before > 5  # it arrived in pieces
        # the server saw the whole conversation: system prompt, both questions and the first reply
        assert loop.stats()["prompt_tokens"] - prompt_tokens_before == prompt_tokens
        history.append({"role": "assistant", "content": reply})
    assert not browser.find_elements(By.CSS_SELECTOR, ".error")
    assert texts(browser, ".msg.user") == ["Hello, world!", "What is 7 + 8?"]
    browser.save_screenshot(os.environ.get("SERVE_SCREENSHOT", str(tmp_path / "chat.png")))


def test_new_chat_mid_reply_and_a_cut_off_stream(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    served.pace[0] = 0.05  # replies take seconds: there is time to act in the middle of one
    open_page(browser, served, {"temperature": "0"})  # max_tokens left empty: to the end of the context
    say(browser, "Hello, world!")
    WebDriverWait(browser, 30).until(lambda d: texts(d, ".msg.assistant")[0])  # the reply has begun
    browser.find_element(By.ID, "new").click()  # "New chat" while it streams
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "stop").get_property("disabled"))
    served.pace[0] = 0.005
    before = served.loop.stats()["prompt_tokens"]
    say(browser, "What is 7 + 8?")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]"))
    expected, prompt_tokens = served.greedy_reply([{"role": "user", "content": "What is 7 + 8?"}], 128)
    assert served.loop.stats()["prompt_tokens"] - before == prompt_tokens  # nothing of the old chat was sent
    assert texts(browser, ".msg.user") == ["What is 7 + 8?"] and texts(browser, ".msg.assistant") == [expected]
    assert browser.find_element(By.ID, "status").text != "stopped" and not texts(browser, ".error")
    # a stream that ends without [DONE] (the connection cut mid-reply) is an error, not a finished reply
    served.pace[0] = 0.05
    browser.find_element(By.ID, "new").click()
    say(browser, "Hello, world!")
    WebDriverWait(browser, 30).until(lambda d: texts(d, ".msg.assistant") not in ([], [""]))  # under way
    for sock in list(served.server.deadlines):  # every connection cut, as a proxy or a crashed server would
        sock.shutdown(socket.SHUT_RDWR)
    WebDriverWait(browser, 30).until(lambda d: texts(d, ".error"))
    assert "cut off" in texts(browser, ".error")[0]
    assert "tokens in" not in browser.find_element(By.ID, "status").text
