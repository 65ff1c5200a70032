"""serve.py's chat page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
type a message, watch the reply stream in, send a second turn and check the server got the whole history."""
import os
import shutil
import tempfile
import threading
import time

import pytest

from sample import Engine, generate, load, stop_ids_for
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


def test_chat_page_streams_and_keeps_history(tiny_model_dir, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    model, tokenizer = load(tiny_model_dir)
    stop_ids = stop_ids_for(tiny_model_dir, tokenizer)
    engine = Engine(model, 4, stop_ids=stop_ids, vocab_size=tokenizer.vocab_size)
    loop = EngineLoop(engine, tokenizer).start()
    step = engine.step

    def paced_step():  # a few ms a token, so that the page visibly streams
        time.sleep(0.005)
        step()

    engine.step = paced_step
    server = make_server(loop, port=0, model_name="tiny", log_requests=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def greedy_reply(messages, max_tokens):
        ids = tokenizer.render_chat(messages, add_generation_prompt=True)[0]
        tokens = generate(model, [ids], max_tokens, temperature=0.0, stop_ids=stop_ids)[0]
        return tokenizer.decode([t for t in tokens if t not in stop_ids]), len(ids)

    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        system = "You are terse."
        browser.find_element(By.ID, "system").send_keys(system)
        for field, value in (("temperature", "0"), ("max_tokens", "24")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        # count the updates of the reply bubble: a streamed reply changes many times
        browser.execute_script("""
            window.updates = 0;
            new MutationObserver(() => window.updates++).observe(document.getElementById('messages'),
                {childList: true, characterData: true, subtree: true});""")
        history = [{"role": "system", "content": system}]
        replies = []
        for turn, question in enumerate(["Hello, world!", "What is 7 + 8?"]):
            updates_before = browser.execute_script("return window.updates")
            prompt_tokens_before = loop.stats()["prompt_tokens"]
            box = browser.find_element(By.ID, "input")
            box.send_keys(question)
            box.send_keys(Keys.ENTER)
            done = (By.CSS_SELECTOR, ".assistant[data-done]")
            WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(*done)) == turn + 1)
            bubble = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[turn]
            reply = bubble.get_property("textContent")
            history.append({"role": "user", "content": question})
            expected, prompt_tokens = greedy_reply(history, 24)
            assert reply == expected and len(reply) > 0
            assert browser.execute_script("return window.updates") - updates_before > 5  # it arrived in pieces
            # the server saw the whole conversation: system prompt, both questions and the first reply
            assert loop.stats()["prompt_tokens"] - prompt_tokens_before == prompt_tokens
            history.append({"role": "assistant", "content": reply})
            replies.append(reply)
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")
        assert [e.get_property("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user")] == [
            "Hello, world!", "What is 7 + 8?"]
        browser.save_screenshot(os.environ.get("SERVE_SCREENSHOT", str(tmp_path / "chat.png")))
    finally:
        server.shutdown()
        server.server_close()
        loop.stop()
