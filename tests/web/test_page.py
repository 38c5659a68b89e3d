"""The web chat page (src/http/page.html) in headless Chromium, through Selenium.

Usage: test_page.py BASE_URL [SCREENSHOT.png]

BASE_URL is a running `chathub serve --http` (e.g. http://127.0.0.1:8000), best with a model
that never stops on its own and is slow, so that a reply is still streaming when Stop is clicked.
The screenshot, when asked for, is taken after the first reply.

Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver;
CHROMIUM and CHROMEDRIVER override them) and the `selenium` package; nothing is downloaded.
With CHATHUB_PAGE_TEST_ALLOW_EARLY_FINISH=1 (for a fast model that may finish a long reply
before Stop can be clicked) a reply that ends before Stop is a warning, not a failure.
"""

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

REPLY_TIMEOUT = 60
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and politely."
FIRST = "你好，介绍一下你自己"
SECOND = "Please write a long story about a lighthouse keeper."
THIRD = "Is this bold? <b>x</b> <img src=x onerror=\"window.__xss=1\"> 好的"


class Failure(Exception):
    pass


def check(condition, what):
    if not condition:
        raise Failure(what)
    print(f"ok: {what}", flush=True)


def wait_for(what, predicate, timeout):
    """Polls predicate until it returns a truthy value; fails with `what` on timeout."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except WebDriverException as e:  # a node replaced between two looks: look again
            last_error = e
        time.sleep(0.05)
    raise Failure(f"timed out after {timeout} s waiting for {what}"
                  + (f" (last error: {last_error.msg})" if last_error else ""))


def early_finish(message):
    """A reply that should have streamed until stopped ended by itself."""
    if os.environ.get("CHATHUB_PAGE_TEST_ALLOW_EARLY_FINISH") != "1":
        raise Failure(message + " (the test needs a model that does not stop by itself)")
    print(f"WARNING: {message}: the Stop checks are skipped", flush=True)


def norm(text):
    """Text without what rendering may drop or move: whitespace and Markdown marks."""
    return re.sub(r"[\s`*~]", "", text)


def http_json(url):
    """GET url as JSON, or None when it cannot be read (e.g. an API key is required)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def cancelled_total(base):
    """chathub_requests_cancelled_total from /metrics, or None when unreadable."""
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return None
    match = re.search(r"^chathub_requests_cancelled_total (\d+)", text, re.M)
    return int(match.group(1)) if match else None


def make_driver():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,800", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    set_viewport(driver, 1280, 800)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    return driver


def set_viewport(driver, width, height):
    """Sizes the window so that the page itself (not the window) is width x height."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight];")
    if inner != [width, height]:
        driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])


class Page:
    def __init__(self, driver):
        self.d = driver

    def find(self, css):
        return self.d.find_element(By.CSS_SELECTOR, css)

    def all(self, css):
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def assistants(self):
        return self.all("#messages .message.assistant")

    def users(self):
        return self.all("#messages .message.user")

    def state(self, message):
        return message.get_attribute("data-state")

    def text(self, message):
        return message.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent")

    def set_value(self, css, value):
        """Sets an input's value as a user would, firing input and change events."""
        self.d.execute_script(
            "const e = document.querySelector(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event('input', {bubbles: true}));"
            "e.dispatchEvent(new Event('change', {bubbles: true}));",
            css, value)

    def type_into(self, css, text):
        element = self.find(css)
        element.clear()
        # ChromeDriver's send_keys types characters outside the BMP poorly: the tests keep to
        # the BMP (CJK is in it).
        element.send_keys(text)

    def wait_reply(self, index, states, timeout=REPLY_TIMEOUT):
        """Waits until assistant message `index` has one of `states`; fails on `error`."""
        def settled():
            replies = self.assistants()
            if len(replies) <= index:
                return None
            state = self.state(replies[index])
            if state == "error" and "error" not in states:
                notice = replies[index].find_elements(By.CSS_SELECTOR, ".notice")
                raise Failure("the reply failed: "
                              + (notice[0].get_attribute("textContent") if notice else "(no message)"))
            return replies[index] if state in states else None
        return wait_for(f"assistant message {index + 1} to reach {'/'.join(states)}", settled, timeout)

    def snapshot(self, index):
        """Assistant message `index`'s state and whether Send and Stop are enabled, read at one
        instant (a fast reply may end between two separate looks)."""
        return self.d.execute_script(
            "const m = document.querySelectorAll('#messages .message.assistant')[arguments[0]];"
            "return [m ? m.getAttribute('data-state') : null,"
            " !document.getElementById('send').disabled, !document.getElementById('stop').disabled];",
            index)

    def request_bodies(self):
        return self.d.execute_script("return window.__bodies || [];")


def record_requests(driver):
    """Wraps fetch to keep the chat requests' bodies (the page calls the global fetch)."""
    driver.execute_script("""
        if (!window.__bodies) {
          window.__bodies = [];
          const original = window.fetch;
          window.fetch = function (url, init) {
            if (String(url).indexOf('/v1/chat/completions') >= 0 && init && init.body) {
              window.__bodies.push(JSON.parse(init.body));
            }
            return original.apply(this, arguments);
          };
        }""")


def run(base, screenshot):
    driver = make_driver()
    page = Page(driver)
    try:
        driver.get(base + "/")
        check(driver.title != "", f"the page loads ({driver.title!r})")
        for hook in ("#messages", "#input", "#send", "#stop", "#new-chat", "#system",
                     "#temperature", "#max-tokens", "#api-key", "#model"):
            check(len(page.all(hook)) == 1, f"the page has {hook}")
        check(page.find("#send").is_enabled() and not page.find("#stop").is_enabled(),
              "idle: Send is enabled, Stop is disabled")

        # The model's name, as GET /v1/models gives it.
        models = http_json(base + "/v1/models")
        expected = models["data"][0]["id"] if models and models.get("data") else None

        def model_shown():
            text = page.find("#model").text.strip()
            if expected:
                return text == expected and text
            return text and "loading" not in text and text
        shown = wait_for("the model name in #model", model_shown, 30)
        check(True, f"#model shows the model name {shown!r}")

        record_requests(driver)

        # First turn: a system prompt, greedy decoding, a short reply, CJK in the question.
        page.type_into("#system", SYSTEM_PROMPT)
        page.set_value("#temperature", "0")
        page.type_into("#max-tokens", "24")
        page.type_into("#input", FIRST)
        page.find("#send").click()
        users = wait_for("the user message", lambda: page.users(), 10)
        check(page.text(users[0]) == FIRST, "the user message shows the CJK text exactly")
        check(page.find("#input").get_attribute("value") == "", "sending clears the input")
        first = page.wait_reply(0, ("streaming", "done"), 10)
        check(True, f"an assistant message appears (data-state={page.state(first)})")
        state, send_on, stop_on = page.snapshot(0)
        if state == "streaming":
            check(not send_on and stop_on, "while streaming: Send is disabled, Stop is enabled")
        first = page.wait_reply(0, ("done",))
        reply = page.text(first)
        check(reply.strip() != "", f"the first reply is done and not empty ({len(reply)} characters)")
        check(page.find("#send").is_enabled() and not page.find("#stop").is_enabled(),
              "after the reply: Send is enabled, Stop is disabled")
        body = page.request_bodies()[0]
        check(body.get("stream") is True and body.get("max_tokens") == 24
              and body.get("temperature") == 0,
              "the request streams, with max_tokens 24 and temperature 0")
        check(body["messages"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                   {"role": "user", "content": FIRST}],
              "the request sends the system prompt, then the question")
        if screenshot:
            driver.save_screenshot(screenshot)
            check(os.path.getsize(screenshot) > 0, f"screenshot saved to {screenshot}")

        # Second turn: a long reply, stopped while it streams. Enter sends.
        page.type_into("#max-tokens", "2000")
        cancelled_before = cancelled_total(base)
        page.type_into("#input", SECOND)
        page.find("#input").send_keys(Keys.ENTER)
        second = page.wait_reply(1, ("streaming", "done"), 10)
        # Wait for some text, so that the partial reply can be seen to stay.
        deadline = time.monotonic() + REPLY_TIMEOUT
        while (page.state(second) == "streaming" and not page.text(second).strip()
               and time.monotonic() < deadline):
            time.sleep(0.05)
        if page.state(second) != "streaming":
            early_finish("the second reply ended on its own before Stop could be clicked")
        else:
            state, send_on, stop_on = page.snapshot(1)
            check(state != "streaming" or (stop_on and not send_on),
                  "while streaming: Stop is enabled, Send is disabled")
            partial = page.text(second)
            page.find("#stop").click()
            ended = wait_for("the stopped reply's data-state=stopped",
                             lambda: page.state(page.assistants()[1]) in ("stopped", "done") and
                             page.state(page.assistants()[1]), 10)
            if ended == "done":
                early_finish("the second reply ended on its own as Stop was clicked")
            else:
                check(page.state(page.assistants()[1]) == "stopped",
                      "clicking Stop marks the reply data-state=stopped")
                after = page.text(page.assistants()[1])
                check(norm(after).startswith(norm(partial)) and (norm(after) or not norm(partial)),
                      f"the partial reply stays visible ({len(after)} characters)")
                meta = page.assistants()[1].find_element(By.CSS_SELECTOR, ".meta").text
                check("stopped" in meta.lower(), f"the reply is marked stopped ({meta!r})")
                check(page.find("#send").is_enabled() and not page.find("#stop").is_enabled(),
                      "after Stop: Send is enabled again, Stop is disabled")
                time.sleep(1)
                check(page.state(page.assistants()[1]) == "stopped", "the reply stays stopped")
                if cancelled_before is not None:
                    wait_for("the server to count the stream as cancelled (/metrics)",
                             lambda: (cancelled_total(base) or 0) > cancelled_before, 20)
                    check(True, "the server cancelled the generation when the page hung up")
                else:
                    print("note: /metrics unreadable: the server-side cancel is not checked")

        # Third turn: HTML in the user's text is shown as text, never as markup.
        page.type_into("#max-tokens", "24")
        page.type_into("#input", THIRD)
        page.find("#send").click()
        third = page.wait_reply(2, ("done",))
        user = page.users()[2]
        check(page.text(user) == THIRD, "the user's <b>x</b> and <img> show as literal text")
        check(not user.find_elements(By.CSS_SELECTOR, "b, img"), "no <b> or <img> element was made")
        check(not page.all("#messages img, #messages script"), "the conversation holds no img or script")
        check(driver.execute_script("return window.__xss === undefined"), "no injected handler ran")
        check(page.text(third).strip() != "", "the third reply is done and not empty")
        bodies = page.request_bodies()
        check(len(bodies) == 3, "three chat requests were sent")
        roles = [m["role"] for m in bodies[2]["messages"]]
        # A stopped reply stays in the conversation when it has any text.
        second_shown = page.text(page.assistants()[1]).strip()
        expected_roles = ["system", "user", "assistant", "user"] + (
            ["assistant"] if second_shown else []) + ["user"]
        check(roles == expected_roles, f"the third request carries the whole conversation ({roles})")
        check(bodies[2]["messages"][1]["content"] == FIRST
              and norm(bodies[2]["messages"][2]["content"]) == norm(reply)
              and bodies[2]["messages"][-1]["content"] == THIRD,
              "earlier turns are sent back as they were shown")

        # Shift+Enter is a new line, not a send.
        page.find("#input").clear()
        page.find("#input").send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "line two")
        check(page.find("#input").get_attribute("value") == "line one\nline two"
              and len(page.users()) == 3, "Shift+Enter inserts a new line")

        # New chat clears the conversation.
        page.find("#new-chat").click()
        check(not page.all("#messages .message"), "New chat clears the messages")
        page.find("#input").clear()
        page.type_into("#max-tokens", "8")
        page.type_into("#input", "再来一次")
        page.find("#send").click()
        page.wait_reply(0, ("done",))
        last = page.request_bodies()[-1]["messages"]
        check([m["role"] for m in last] == ["system", "user"], "after New chat only the new question is sent")

        # A phone's width: nothing runs off the side, the composer is usable.
        set_viewport(driver, 390, 844)
        time.sleep(0.3)
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;")
        check(overflow <= 0, "at a phone's width nothing overflows sideways")
        check(page.find("#input").is_displayed() and page.find("#send").is_displayed(),
              "at a phone's width the input and Send are visible")
        set_viewport(driver, 1280, 800)

        # The browser's console: no CSP violation, no script error.
        try:
            logs = driver.get_log("browser")
        except WebDriverException:
            logs = []
        problems = [entry["message"] for entry in logs
                    if "Content Security Policy" in entry["message"]
                    or "Uncaught" in entry["message"]]
        for entry in logs:
            print(f"console: {entry['level']}: {entry['message']}")
        check(not problems, "no CSP violations or script errors in the console"
              + (": " + "; ".join(problems) if problems else ""))
    except Failure:
        try:
            driver.save_screenshot(os.path.join(os.environ.get("TMPDIR", "/tmp"), "chathub-page-failure.png"))
            print("(a screenshot of the failure: "
                  + os.path.join(os.environ.get("TMPDIR", "/tmp"), "chathub-page-failure.png") + ")")
        except WebDriverException:
            pass
        raise
    finally:
        driver.quit()


def main():
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    base = sys.argv[1].rstrip("/")
    screenshot = sys.argv[2] if len(sys.argv) == 3 else None
    try:
        run(base, screenshot)
    except Failure as e:
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except WebDriverException as e:
        print(f"FAILED: the browser: {e.msg or e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print("all checks passed", flush=True)


if __name__ == "__main__":
    main()
