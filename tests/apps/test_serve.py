"""The web page (``serve``, bengali_empathy.apps.serve): its endpoints through ``gradio_client``, the login over
HTTP, and the page itself in a real headless Chromium, against ``serve`` on the README's default fit."""
import html
import os
import shutil
import socket
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli

from bengali_empathy.generation.chat import EMPTY_REPLY, Reply

gr = pytest.importorskip("gradio", reason="serve needs the serve extra: pip install -e '.[serve]'")
from gradio_client import Client  # noqa: E402  (installed with gradio)

USER, PASSWORD = "rina", "s3cret-pass"
MAX_NEW_TOKENS = 6
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Public without a login, by Gradio's design: the login page and its assets, who is logged in (nobody),
# the app's id, whether startup events ran, and cancelling / resetting an event whose secret ids one must know.
PUBLIC = {"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/robots.txt", "/manifest.json",
          "/gradio_api/theme.css", "/gradio_api/user", "/gradio_api/user/", "/gradio_api/token",
          "/gradio_api/token/", "/gradio_api/app_id", "/gradio_api/app_id/", "/gradio_api/startup-events",
          "/gradio_api/runs", "/gradio_api/runs/", "/gradio_api/cancel", "/gradio_api/reset", "/gradio_api/reset/"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(default_fit, tmp_path_factory):
    """``python -m bengali_empathy serve`` (the CLI's main, in a thread) on the default fit's adapter and a
    copy of its registry, with a login."""
    import httpx

    from bengali_empathy.models.checkpoints import read_info
    from bengali_empathy.cli import main

    where = tmp_path_factory.mktemp("serve")
    db = where / "experiments.db"
    shutil.copy(default_fit[0] / "lightning_logs" / "experiments.db", db)
    with sqlite3.connect(db) as con:  # the fit's experiment, and the newest with replies: the prompts to rate
        fit_id = con.execute("SELECT MIN(id) FROM LLAMAExperiments").fetchone()[0]
        rated_id = con.execute("SELECT MAX(experiment_id) FROM GeneratedResponses").fetchone()[0]
    adapter = default_fit[1] / "adapter"
    port = _free_port()
    args = ["serve", "--adapter", str(adapter), "--db", str(db), "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--port", str(port), "--auth", f"{USER}:{PASSWORD}", "--pairs", "4"]
    thread = threading.Thread(target=main, args=(args,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert thread.is_alive() and time.monotonic() < deadline, "serve did not start"
        time.sleep(0.5)
    yield SimpleNamespace(url=url, db=db, adapter=adapter, system_prompt=read_info(str(adapter)).system_prompt,
                          screenshots=where, fit_id=fit_id, rated_id=rated_id)
    gr.close_all(verbose=False)


def _client(server, password=PASSWORD) -> Client:
    return Client(server.url + "/", auth=(USER, password), verbose=False)


def _chat(client, message):
    """(the chat's turns as plain text, the info line) after sending ``message``."""
    shown, info, _ = client.predict(message, "greedy", 0.7, 0.9, MAX_NEW_TOKENS, api_name="/chat")
    return [(t["role"], html.unescape(t["content"][0]["text"])) for t in shown], info


def _prompt_tokens(info: str) -> int:
    return int(info.split("prompt ", 1)[1].split(" tokens", 1)[0])


def test_bad_serve_options_are_one_line_errors(default_fit, tmp_path):
    adapter = str(default_fit[1] / "adapter")
    for args, message in ((["serve"], "serve needs --adapter DIR"),
                          (["serve", "--adapter", adapter, "--auth", "rina"], "--auth must be USER:PASS"),
                          (["serve", "--adapter", adapter, "--port", "0"], "--port must be from 1 to 65535, not 0"),
                          (["serve", "--adapter", adapter, "--pairs", "0"], "--pairs must be at least 1, not 0"),
                          (["serve", "--adapter", adapter, "--db", str(default_fit[0] / "lightning_logs" /
                                                                    "experiments.db"), "--run", "99"],
                           "no experiment '99'")):
        r = run_cli(args, cwd=tmp_path)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], r.stderr[-2000:]


def test_serve_without_gradio_names_the_extra(tmp_path, monkeypatch):
    """Without Gradio, serve stops with one line naming the extra, before it reads the adapter or loads a model
    (the adapter here does not exist)."""
    import sys

    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` finds where it is not installed
    # serve's module is imported afresh whether or not an earlier test in this worker imported it
    monkeypatch.delitem(sys.modules, "bengali_empathy.apps.serve", raising=False)
    r = run_cli(["serve", "--adapter", str(tmp_path / "no_adapter"), "--db", str(tmp_path / "e.db")], cwd=tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and errors == ["error: serve needs Gradio: pip install -e '.[serve]'"], r.stderr[-2000:]
    assert "bengali_empathy.apps.serve" not in sys.modules  # the import was tried, and failed on Gradio
    assert not list(tmp_path.iterdir())  # nothing written: no registry file


def test_every_route_wants_the_login(server):
    import httpx

    (page,) = [b for b in gr.Blocks.get_instances() if b.is_running]
    routes = []
    for route in page.server_app.routes:
        routes += getattr(getattr(route, "original_router", None), "routes", [route])
    answers = {}
    for route in routes:
        path = getattr(route, "path", None)
        for method in sorted(set(getattr(route, "methods", None) or ()) - {"HEAD"}):
            if path is None or path in PUBLIC or "heartbeat" in path:  # the heartbeat is a stream that stays open
                continue
            url = server.url + path.replace("{path:path}", "x").replace("{", "").replace("}", "")
            answers[f"{method} {path}"] = httpx.request(method, url, json={}, timeout=5).status_code
    assert len(answers) > 40 and "POST /gradio_api/queue/join" in answers and "GET /config" in answers
    assert {k: v for k, v in answers.items() if v < 400} == {}
    assert answers["GET /config"] == answers["POST /gradio_api/queue/join"] == 401
    assert httpx.get(server.url + "/openapi.json").status_code == 404  # no API description without a login


def test_a_wrong_password_is_refused(server):
    import httpx

    r = httpx.post(server.url + "/login", data={"username": USER, "password": "wrong"})
    assert r.status_code == 400 and "Incorrect credentials" in r.text
    with pytest.raises(Exception, match="(?i)could not login|credentials|401"):
        _client(server, password="wrong")
    ok = httpx.post(server.url + "/login", data={"username": USER, "password": PASSWORD})
    assert ok.status_code == 200 and httpx.get(server.url + "/config", cookies=ok.cookies).status_code == 200


def test_two_sessions_keep_separate_conversations(server, tokenizer):
    from bengali_empathy.data import ChatEncoder

    first, second = _client(server), _client(server)
    turns, info = _chat(first, "আমি খুব একা।")
    assert "0 earlier turns" in info
    _, other = _chat(second, "আজ ঘুম আসছে না।")
    assert "0 earlier turns" in other  # the other session's message is not in this one's history
    turns, info = _chat(first, "ভয় লাগছে।")
    assert [r for r, _ in turns] == ["user", "assistant", "user", "assistant"] and "2 earlier turns" in info
    expected = ChatEncoder(tokenizer).prompt_ids(server.system_prompt, [{"role": r, "content": t} for r, t in turns[:3]])
    assert _prompt_tokens(info) == len(expected)
    shown, _, _ = first.predict(api_name="/clear")
    assert shown == [] and "0 earlier turns" in _chat(first, "ভয় লাগছে।")[1]


def test_bad_input_is_a_message_in_the_page(server):
    client = _client(server)
    for args, api, message in ((("", "greedy", 0.7, 0.9, 4), "/chat", "the message is empty"),
                               (("ভয় " * 900, "greedy", 0.7, 0.9, 4), "/chat", "the message is too long"),
                               (("greedy", 0.7, 0.9, 4), "/regenerate", "there is no reply to regenerate yet"),
                               (("রিনা", "A", ""), "/rate_submit", "no pair to judge")):
        extra = (None,) * 10 if api == "/rate_submit" else ()
        with pytest.raises(Exception, match=message):
            client.predict(*args, *extra, api_name=api)


def test_a_prompt_typed_by_the_rater_is_judged_too(server):
    client = _client(server)
    progress, prompt, a, b, *_ = client.predict("আমার কথা কেউ শোনে না।", api_name="/rate_own")
    assert progress == "Your prompt: Pair 1 of 1." and prompt == "আমার কথা কেউ শোনে না।" and a and b and a != b
    progress, *_ = client.predict("অতিথি", "tie", "", *(None,) * 10, api_name="/rate_submit")
    assert progress == "Saved judgement 1. Done: 1 of 1 rated, thank you."
    with sqlite3.connect(server.db) as con:
        assert con.execute("SELECT prompt, experiment_id, rater FROM PreferenceJudgements WHERE rater = 'অতিথি'"
                           ).fetchall() == [("আমার কথা কেউ শোনে না।", None, "অতিথি")]


def test_side_by_side_and_sampling(server):
    client = _client(server)
    tuned, base, info = client.predict("আমি খুব একা।", "greedy", 0.7, 0.9, MAX_NEW_TOKENS, api_name="/compare")
    assert tuned and base and tuned != base and info.startswith("base: prompt")
    _chat(client, "আমি খুব একা।")
    shown, info, _ = client.predict("sample", 1.5, 1.0, MAX_NEW_TOKENS, api_name="/regenerate")
    assert len(shown) == 2 and "sampled with seed" in info  # the reply was replaced, not added


# --------------------------------------------------------------------------- the page in Chromium

needs_chromium = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                           "chromium-driver)")


def _new_browser(server):
    """A headless Chromium of its own (its own cookies: a session of its own) on the page."""
    from selenium import webdriver  # the test extra
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1300",
                "--lang=bn"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(server.url + "/")
    return driver


@pytest.fixture(scope="module")
def browser(server):
    """A headless Chromium logged in to the page (shared by this module's browser tests, whichever runs first)."""
    from selenium.webdriver.common.by import By

    driver = _new_browser(server)
    _login(driver, PASSWORD)
    _wait(driver, lambda: driver.find_elements(By.ID, "chat-send"))
    yield driver
    driver.quit()


def _wait(driver, condition, seconds=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.2).until(lambda d: condition())


def _by_id(driver, elem_id, inner=""):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} {inner}".strip())


def _value(driver, elem_id) -> str:
    return _by_id(driver, elem_id, "textarea").get_attribute("value")


def _type(driver, elem_id, text):
    box = _by_id(driver, elem_id, "textarea")
    box.clear()
    driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                          box, text)  # send_keys types outside the BMP poorly; the input event is what Gradio reads


def _tab(driver, name):
    from selenium.webdriver.common.by import By

    next(t for t in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == name).click()


def _open_an_empty_chat(driver):
    """The Chat tab, cleared: no turns, no info line."""
    from selenium.webdriver.common.by import By

    _tab(driver, "Chat")
    _by_id(driver, "chat-clear").click()
    _wait(driver, lambda: _value(driver, "chat-info") == ""
          and not driver.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]"))


def _screenshot(driver, server, name) -> Path:
    """Save the window as PNG (also into $BENGALI_EMPATHY_SCREENSHOTS, for the README) and check it is not blank."""
    import numpy as np
    from PIL import Image

    path = server.screenshots / f"serve_{name}.png"
    driver.save_screenshot(str(path))
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert pixels.std() > 20 and len(np.unique(pixels)) > 50, f"{path} looks blank"
    if os.environ.get("BENGALI_EMPATHY_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["BENGALI_EMPATHY_SCREENSHOTS"]) / path.name)
    return path


def _login(driver, password):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "input[type=password]"))
    user, secret = driver.find_element(By.CSS_SELECTOR, "input[type=text]"), \
        driver.find_element(By.CSS_SELECTOR, "input[type=password]")
    user.clear()
    secret.clear()
    user.send_keys(USER)
    secret.send_keys(password + Keys.ENTER)


@needs_chromium
def test_browser_refuses_a_wrong_password_then_logs_in(server):
    from selenium.webdriver.common.by import By

    browser = _new_browser(server)  # a browser of its own, not yet logged in
    try:
        _login(browser, "wrong")
        _wait(browser, lambda: "Incorrect Credentials" in browser.find_element(By.TAG_NAME, "body").text)
        assert not browser.find_elements(By.ID, "chat-send")
        _login(browser, PASSWORD)
        _wait(browser, lambda: browser.find_elements(By.ID, "chat-send"))
    finally:
        browser.quit()


@needs_chromium
def test_browser_chat_is_a_conversation_shown_as_text(browser, server, tokenizer):
    from selenium.webdriver.common.by import By

    from bengali_empathy.data import ChatEncoder

    def send(text, earlier):
        _type(browser, "chat-message", text)
        _by_id(browser, "chat-send").click()
        _wait(browser, lambda: f"{earlier} earlier turns" in _value(browser, "chat-info")
              and "new tokens" in _value(browser, "chat-info"))
        return _value(browser, "chat-info")

    _open_an_empty_chat(browser)  # whatever the module's other browser tests left in this session
    first = "আমি খুব একা।"
    send(first, 0)
    reply = _client(server)  # the same greedy reply, as exact text, for the independent token count
    turns, _ = _chat(reply, first)
    info = send("ভয় লাগছে।", 2)
    shown = [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")]
    assert " ".join(shown[0].split()) == " ".join(turns[1][1].split())
    expected = ChatEncoder(tokenizer).prompt_ids(server.system_prompt, [
        {"role": "user", "content": first}, {"role": "assistant", "content": turns[1][1]},
        {"role": "user", "content": "ভয় লাগছে।"}])
    assert _prompt_tokens(info) == len(expected)
    markup = '<img src=x onerror="window.__injected=1"><b>bold</b>'
    send(markup, 4)
    user_texts = [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=user]")]
    assert user_texts[-1] == markup  # shown as the text it is ...
    assert not browser.find_elements(By.CSS_SELECTOR, "#chatbot img[src='x'], #chatbot b")  # ... not as markup
    assert browser.execute_script("return window.__injected") is None
    _screenshot(browser, server, "chat")


@needs_chromium
def test_two_browsers_keep_separate_conversations(browser, server):
    """A second person's conversation starts empty, and the first person's goes on from where it was."""
    from selenium.webdriver.common.by import By

    def send(driver, text):
        if not driver.find_elements(By.ID, "chat-send"):
            _login(driver, PASSWORD)
            _wait(driver, lambda: driver.find_elements(By.ID, "chat-send"))
        before = len(driver.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]"))
        _type(driver, "chat-message", text)
        _by_id(driver, "chat-send").click()
        _wait(driver, lambda: f"{2 * before} earlier turns" in _value(driver, "chat-info")
              and "new tokens" in _value(driver, "chat-info"))
        return before

    _tab(browser, "Chat")
    first = send(browser, "আজ মন ভালো নেই।")
    second = _new_browser(server)
    try:
        assert send(second, "ঘুম আসে না।") == 0  # nothing of the first person's conversation
        assert send(browser, "কী করব বুঝতে পারছি না।") == first + 1  # the first one's goes on
        assert send(second, "আবার বলছি।") == 1
    finally:
        second.quit()


@needs_chromium
def test_browser_side_by_side(browser, server):
    """The two boxes hold the tuned model's and the base model's greedy replies to the message: those of a
    Replier loaded here on the same adapter, and the tuned one is what the chat answers."""
    from bengali_empathy.apps.chat import load_chat
    from bengali_empathy.models.checkpoints import read_info

    message = "আজ খুব ভয় লাগছে, কী করব?"
    _tab(browser, "Side by side")
    _type(browser, "side-message", message)
    _by_id(browser, "side-send").click()
    _wait(browser, lambda: _value(browser, "side-info").startswith("base:") and "new tokens" in _value(browser, "side-info"))
    info = read_info(str(server.adapter))
    replier = load_chat(info.model_name_or_path, str(server.adapter), "auto", True, MAX_NEW_TOKENS,  # as serve
                        server.system_prompt, info.max_seq_length)                           # loads it
    turns = [{"role": "user", "content": message}]
    tuned, base = replier.reply(turns).text, replier.reply(turns, base=True).text
    assert tuned and base and tuned != base  # the adapter changes this reply
    assert (_value(browser, "side-tuned"), _value(browser, "side-base")) == (tuned, base)
    chat_turns, _ = _chat(_client(server), message)
    assert chat_turns[1] == ("assistant", tuned)
    _screenshot(browser, server, "side_by_side")


@needs_chromium
def test_browser_blind_rating_commits_each_judgement(browser, server):
    from selenium.webdriver.common.by import By

    _tab(browser, "Blind rating")
    _wait(browser, lambda: _value(browser, "rate-rater") == USER)  # preset to the login name
    _by_id(browser, "rate-start").click()
    _wait(browser, lambda: "Pair 1 of 4" in _by_id(browser, "rate-progress").text)
    shown = []
    for k, choice in enumerate(("A", "B", "tie"), 1):
        shown.append((_value(browser, "rate-prompt"), _value(browser, "rate-reply-A"), _value(browser, "rate-reply-B")))
        _by_id(browser, "rate-choice", f"input[value='{choice}']").click()
        _by_id(browser, "rate-A-empathy", f"input[value='{k + 1}']").click()
        _type(browser, "rate-comment", f"মন্তব্য {k}")
        if k == 3:
            _screenshot(browser, server, "blind_rating")
        _by_id(browser, "rate-submit").click()
        _wait(browser, lambda: f"Saved judgement {k}." in _by_id(browser, "rate-progress").text)
    assert "Pair 4 of 4" in _by_id(browser, "rate-progress").text  # the rater leaves here: three are kept
    with sqlite3.connect(server.db) as con:
        rows = con.execute("SELECT prompt, reply_a, reply_b, tuned_side, choice, a_empathy, b_empathy, comment, rater, "
                           "experiment_id FROM PreferenceJudgements WHERE rater = ? ORDER BY id", (USER,)).fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == shown
    assert [(r[4], r[5], r[6], r[7], r[8], r[9]) for r in rows] == [
        ("A", 2, None, "মন্তব্য 1", USER, server.rated_id), ("B", 3, None, "মন্তব্য 2", USER, server.rated_id),
        ("tie", 4, None, "মন্তব্য 3", USER, server.rated_id)]
    client = _client(server)
    for prompt, a, b, tuned_side, *_ in rows:  # the side recorded as tuned holds the tuned model's reply
        tuned, base, _ = client.predict(prompt, "greedy", 0.7, 0.9, MAX_NEW_TOKENS, api_name="/compare")
        assert tuned != base and (a, b) == ((tuned, base) if tuned_side == "A" else (base, tuned))
    _tab(browser, "Runs")
    _by_id(browser, "runs-refresh").click()
    _wait(browser, lambda: "tuned preferred in" in _by_id(browser, "runs-table").text)
    _by_id(browser, "runs-id", "input").clear()
    _by_id(browser, "runs-id", "input").send_keys(str(server.fit_id))
    _by_id(browser, "runs-show").click()
    _wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#runs-plots img")) >= 2)
    assert f"experiment {server.fit_id}: fit" in _by_id(browser, "runs-detail").text
    _screenshot(browser, server, "runs")


def test_the_info_line_says_when_earlier_turns_were_left_out():
    from bengali_empathy.generation.chat import Reply
    from bengali_empathy.apps.serve import describe

    reply = Reply("উত্তর", 700, 2, 4, new_tokens=6, seconds=0.25, seed=7, done=True)
    assert describe(reply, 768) == ("prompt 700 tokens: system prompt + 2 earlier turns + this message; the 4 oldest "
                                    "turns were left out to fit max_seq_length 768; 6 new tokens in 0.2 s; "
                                    "sampled with seed 7")


def test_the_web_page_says_a_reply_is_empty():
    import pytest

    pytest.importorskip("gradio")  # the serve extra
    from bengali_empathy.apps.serve import describe

    assert EMPTY_REPLY in describe(Reply("", 5, 0, 0, done=True), 768)
    assert EMPTY_REPLY not in describe(Reply("", 5, 0, 0, done=False), 768)  # still streaming
