"""The chat page of ``glm4v-mtmd serve``, in a real headless Chromium against a real server on loopback.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). Without them the
tests skip, unless ``GLM4V_MTMD_REQUIRE_BROWSER=1`` (set by CI), where they fail.

The page's screenshot with boxes drawn is written to ``test-artifacts/ui-boxes.png`` at the
repository root (``GLM4V_MTMD_ARTIFACTS`` overrides the folder).
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("selenium")

from serving import Server  # noqa: E402

from glm4v_mtmd import parse_boxes, sample_image  # noqa: E402

KEY = "page-key"
ARTIFACTS = pathlib.Path(os.environ.get("GLM4V_MTMD_ARTIFACTS") or pathlib.Path(__file__).parent.parent
                         / "test-artifacts")

# The scripted answer about the shipped sample picture (640 x 448): the house and the tree.
REPLAY = ("<think>A red house on the left, a tree, the sun.</think><answer>The red house"
          "<|begin_of_box|>[[164,268,494,737]]<|end_of_box|> stands left of a green tree"
          "<|begin_of_box|>[[562,335,728,737]]<|end_of_box|>.</answer>")
GREEDY = {"temperature": 0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}


def _browser_binaries() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    missing = "chromium" if not browser else "chromedriver"
    if os.environ.get("GLM4V_MTMD_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{missing} is not installed (apt-get install chromium chromium-driver)")
    pytest.skip(f"{missing} is not installed (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    binary, driver_path = _browser_binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,1000", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-extensions", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver online
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def tiny_f16(gguf_pair: Any) -> tuple[pathlib.Path, pathlib.Path]:
    return gguf_pair("glm4v", outtype="f16")


@pytest.fixture(scope="module")
def live(tiny_f16: Any) -> Iterator[Server]:
    """The tiny GLM-4.1V model generating for real; no key."""
    srv = Server(tiny_f16, parallel=1)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def scripted(gguf_pair: Any) -> Iterator[Server]:
    """The tiny GLM-4.5V model (thinking switchable) replaying REPLAY; a key is required."""
    srv = Server(gguf_pair("glm4v_moe", outtype="f16"), parallel=1, api_keys=(KEY,), replay=REPLAY)
    yield srv
    srv.stop()


def wait(condition: Callable[[], Any], timeout: float = 30, what: str = "the page") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def open_page(driver: Any, srv: Server) -> None:
    driver.get(f"http://127.0.0.1:{srv.port}/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"http://127.0.0.1:{srv.port}/")
    driver.get_log("browser")  # drop what came before this page


def ready(driver: Any) -> bool:
    return driver.execute_script("return document.body.dataset.ready === '1'")


def by_id(driver: Any, name: str) -> Any:
    return driver.find_element("id", name)


def attach(driver: Any, path: pathlib.Path) -> None:
    before = len(driver.find_elements("css selector", "#attachments li"))
    by_id(driver, "file").send_keys(str(path))
    wait(lambda: len(driver.find_elements("css selector", "#attachments li")) == before + 1, what="the attachment")


def ask(driver: Any, text: str) -> Any:
    """Type a question, press Enter; returns the new answer's element."""
    n = len(driver.find_elements("css selector", "article.assistant"))
    from selenium.webdriver.common.keys import Keys

    box = by_id(driver, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    return wait(lambda: (lambda a: a[n] if len(a) > n else None)(
        driver.find_elements("css selector", "article.assistant")), what="the answer to start")


def finished(driver: Any, answer: Any, timeout: float = 60) -> str:
    return wait(lambda: (lambda s: s if s != "streaming" else None)(answer.get_attribute("data-state")),
                timeout, "the answer to finish")


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def requested_urls(driver: Any) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def sample_png(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "sample.png"
    from PIL import Image

    Image.open(sample_image()).convert("RGB").save(path)
    return path


# ------------------------------------------------------------------------------------- tests


def test_page_loads_offline_without_errors(browser: Any, live: Server) -> None:
    browser.get_log("performance")
    open_page(browser, live)
    wait(lambda: ready(browser), what="the model to be listed")
    assert "tiny" in by_id(browser, "model").text
    # GLM-4.1V-Thinking always reasons: no switch, a note instead.
    assert not by_id(browser, "thinking-switch").is_displayed()
    assert by_id(browser, "thinking-always").is_displayed()
    assert console_errors(browser) == []
    urls = requested_urls(browser)
    assert any(u.endswith("/ui/app.js") for u in urls) and any(u.endswith("/v1/models") for u in urls)
    for url in urls:
        parsed = urllib.parse.urlsplit(url)
        assert parsed.scheme in ("data", "blob") or parsed.netloc == f"127.0.0.1:{live.port}", url


def test_page_headers_forbid_other_hosts(live: Server) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert resp.status == 200 and b'src="ui/app.js"' in resp.read()
    csp = resp.getheader("content-security-policy")
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert resp.getheader("x-content-type-options") == "nosniff"
    for path, status in (("/ui/app.js", 200), ("/ui/boxes.js", 200), ("/ui/style.css", 200),
                         ("/ui/index.html", 404), ("/ui/../app.py", 404), ("/ui/page.py", 404)):
        assert live.get(path)[0] == status, path


def test_no_ui_turns_the_page_off(tiny_f16: Any) -> None:
    srv = Server(tiny_f16, parallel=1, ui=False)
    try:
        assert srv.get("/")[0] == 404 and srv.get("/ui/app.js")[0] == 404
        assert srv.get("/health")[0] == 200
    finally:
        srv.stop()


def test_image_question_streams_the_model_answer(browser: Any, live: Server, tmp_path: pathlib.Path) -> None:
    open_page(browser, live)
    wait(lambda: ready(browser))
    by_id(browser, "settings").click()
    by_id(browser, "max-tokens").send_keys("24")
    by_id(browser, "extra").send_keys(json.dumps(GREEDY))
    image = sample_png(tmp_path)
    attach(browser, image)
    answer = ask(browser, "What is in this picture?")
    assert finished(browser, answer) == "done"
    deltas = int(answer.get_attribute("data-deltas"))
    text = answer.find_element("css selector", ".answer").text
    # The same request through the API gives the same reply (greedy): the page showed the model's answer.
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    status, reply, _ = live.post({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in this picture?"}]}],
        "max_tokens": 24, **GREEDY})
    assert status == 200
    message = reply["choices"][0]["message"]
    tokens = reply["usage"]["completion_tokens"]
    assert deltas > 1  # streamed, not one block
    assert text == message["content"]
    reasoning = answer.find_element("css selector", "details.reasoning")
    if message.get("reasoning_content"):  # folded by default, its text the reply's reasoning
        assert reasoning.get_attribute("open") is None
        assert reasoning.get_attribute("textContent").strip().startswith("Reasoning")
    stats = answer.find_element("css selector", ".stats")
    assert int(stats.get_attribute("data-tokens")) == tokens
    assert float(stats.get_attribute("data-ttft-ms")) > 0 and float(stats.get_attribute("data-tps")) > 0
    assert f"{tokens} tokens" in stats.text and "tokens/s" in stats.text and "first token" in stats.text

    # A follow-up continues the conversation: its prompt comes from the server's cache, image included.
    follow = ask(browser, "And the colours?")
    assert finished(browser, follow) == "done"
    fstats = follow.find_element("css selector", ".stats")
    assert int(fstats.get_attribute("data-cached")) > int(stats.get_attribute("data-prompt-tokens")) // 2
    assert len(browser.find_elements("css selector", "article.user")) == 2
    assert console_errors(browser) == []


def test_stop_ends_the_stream_and_the_generation(browser: Any, live: Server) -> None:
    open_page(browser, live)
    wait(lambda: ready(browser))
    by_id(browser, "settings").click()
    by_id(browser, "extra").send_keys(json.dumps({**GREEDY, "ignore_eos": True, "max_tokens": 3500}))
    before = live.metric("generations_cancelled_total")
    answer = ask(browser, "Write a long story.")
    wait(lambda: int(answer.get_attribute("data-deltas")) > 3, what="streamed text")
    stop = by_id(browser, "stop")
    assert stop.is_displayed() and not by_id(browser, "send").is_displayed()
    stop.click()
    assert finished(browser, answer, timeout=10) == "stopped"
    assert by_id(browser, "send").is_displayed() and not stop.is_displayed()
    live.wait_metric("generations_cancelled_total", before + 1, timeout=10)
    assert answer.find_element("css selector", ".stopped").text == "Stopped."
    assert console_errors(browser) == []


def _box_texts() -> list[str]:
    def span(body: str) -> str:
        return f"<|begin_of_box|>{body}<|end_of_box|>"

    bodies = ["[94,598,177,991]", "[[94,598,177,991]]", "[[ 94, 598, 177, 991 ]]", "[[1,2,3,4],[5,6,7,8]]",
              "[1,2,3,4],[5,6,7,8]", "\n[[10.5, 20, 30.25, 40]]\n", "[500,250]", "[[500, 250]]", "[[1000,1000]]",
              "[[-20,-5,1200,1001]]", "[[800,900,100,200]]", "[[499.5,0.5,500.5,999.9]]", "true", "[[1,2,3]]",
              "[[1,2,3,4]", "[1,2,3,4]]", "[[[1,2,3,4]]]", "[[1,2,3,4,5,6]]", "[[a,b,c,d]]", "box: [1,2,3,4]", "",
              "[[1,2,3,4],[5,6]]", "[ [1,2,3,4] , [5,6,7,8] ]"]
    texts = [f"The object is at {span(b)}." for b in bodies]
    texts += ["".join(span(b) for b in bodies), "<|begin_of_box|>[[1,2,3,4]]", "[[1,2,3,4]]<|end_of_box|>",
              f"cat {span('[[1,2,3,4]]')} dog {span('true')} bird {span('[[5,6]]')} {span('[[7,8,9,10],[1,2,3,4]]')}"]
    rng = __import__("random").Random(5)
    for _ in range(40):  # random boxes written as the model writes them
        values = [rng.choice([rng.randint(0, 1000), round(rng.uniform(-5, 1005), rng.randint(0, 2))])
                  for _ in range(rng.choice([2, 4]))]
        texts.append(span(str([values])))
    return texts


def test_page_reads_boxes_as_parse_boxes_does(browser: Any, live: Server) -> None:
    open_page(browser, live)
    wait(lambda: ready(browser))
    sizes = [(640, 448), (101, 10), (37, 1999), (1, 1), (4000, 3000)]
    texts = _box_texts()
    got = browser.execute_script("""
        const [texts, sizes] = arguments;
        return texts.map(t => GlmBoxes.parseBoxes(t).map(b => [b.x1, b.y1, b.x2, b.y2, b.point, b.span,
            sizes.map(([w, h]) => GlmBoxes.toPixels(b, w, h))]));""", texts, sizes)
    want = [[[b.x1, b.y1, b.x2, b.y2, b.point, b.span, [list(b.to_pixels(w, h)) for w, h in sizes]]
             for b in parse_boxes(t)] for t in texts]
    assert got == want
    assert sum(map(len, want)) > 50


def test_scripted_boxes_are_drawn_in_the_image_pixels(browser: Any, scripted: Server,
                                                      tmp_path: pathlib.Path) -> None:
    open_page(browser, scripted)
    # The server wants a key: the page asks once, then keeps it for the tab.
    dialog = wait(lambda: (lambda d: d if d.is_displayed() else None)(by_id(browser, "key-dialog")),
                  what="the key dialog")
    # The 401 that opened the dialog is expected; Chrome may log it after open_page drained the log.
    browser.get_log("browser")
    by_id(browser, "api-key").send_keys(KEY)
    dialog.find_element("css selector", "button[type=submit]").click()
    wait(lambda: ready(browser), what="the model to be listed with the key")
    assert browser.execute_script("return sessionStorage.getItem('glm4v-mtmd.api-key')") == KEY
    assert by_id(browser, "thinking-switch").is_displayed() and by_id(browser, "thinking").is_selected()

    attach(browser, sample_png(tmp_path))
    answer = ask(browser, "Where are the house and the tree?")
    assert finished(browser, answer) == "done"
    width, height = 640, 448
    expected = [b.to_pixels(width, height) for b in parse_boxes(REPLAY)]
    assert len(expected) == 2
    boxes = answer.find_elements("css selector", ".canvas .box")
    got = [tuple(int(b.get_attribute(f"data-{k}")) for k in ("left", "top", "right", "bottom")) for b in boxes]
    assert got == expected
    # Drawn where those pixels are on the picture as shown (scaled to its displayed size).
    img = answer.find_element("css selector", ".canvas img")
    frame = img.rect
    scale = frame["width"] / width
    assert abs(frame["height"] / height - scale) < 0.01
    for element, (left, top, right, bottom) in zip(boxes, got):
        rect = element.rect
        assert abs(rect["x"] - (frame["x"] + left * scale)) <= 1.5
        assert abs(rect["y"] - (frame["y"] + top * scale)) <= 1.5
        assert abs(rect["width"] - (right - left) * scale) <= 1.5
        assert abs(rect["height"] - (bottom - top) * scale) <= 1.5
    # Labelled with the words around them; the markers are not shown as text.
    assert [b.get_attribute("data-label") for b in boxes] == ["The red house", "stands left of a green tree"]
    text = answer.find_element("css selector", ".answer").text
    assert "begin_of_box" not in text and text.startswith("The red house")
    chips = answer.find_elements("css selector", ".chip")
    assert [c.text for c in chips] == ["1", "2"]
    assert chips[0].get_attribute("aria-label") == "box 1: The red house"
    reasoning = answer.find_element("css selector", "details.reasoning")
    assert reasoning.get_attribute("open") is None
    assert "A red house on the left" in reasoning.get_attribute("textContent")
    # Hovering a label highlights its box, only that one.
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(chips[1]).perform()
    wait(lambda: "hl" in boxes[1].get_attribute("class"), what="the highlight")
    assert "hl" not in boxes[0].get_attribute("class")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert answer.screenshot(str(ARTIFACTS / "ui-boxes.png"))
    browser.execute_script("window.scrollTo(0, document.documentElement.scrollHeight)")
    assert browser.save_screenshot(str(ARTIFACTS / "ui-page.png"))

    # Saved picture: the image at its own size with the boxes drawn.
    answer.find_element("css selector", "button.save").click()
    saved = wait(lambda: next(iter(browser.downloads.glob("glm4v-boxes-*.png")), None), what="the download")
    from PIL import Image

    wait(lambda: saved.stat().st_size > 0)
    with Image.open(saved) as picture:
        assert picture.size == (width, height)
        left, top, _, _ = expected[0]
        assert picture.convert("RGB").getpixel((left, top + 20)) == (232, 23, 93)  # the box's edge

    # The thinking switch reaches the server: off, the replayed <think> block is no reasoning.
    by_id(browser, "thinking").click()
    follow = ask(browser, "Again, without thinking.")
    assert finished(browser, follow) == "done"
    assert not follow.find_element("css selector", "details.reasoning").is_displayed()
    assert "A red house on the left" in follow.find_element("css selector", ".answer").text
    assert console_errors(browser) == []


def test_dropped_and_pasted_images_are_attached(browser: Any, live: Server) -> None:
    open_page(browser, live)
    wait(lambda: ready(browser))
    hint_shown = browser.execute_script("""
        const png = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const file = (name) => new File([png], name, {type: "image/png"});
        const dropped = new DataTransfer();
        dropped.items.add(file("dropped.png"));
        document.dispatchEvent(new DragEvent("dragover", {dataTransfer: dropped, cancelable: true}));
        const hint = !document.getElementById("drop-hint").hidden;
        document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: dropped, bubbles: true, cancelable: true}));
        const pasted = new DataTransfer();
        pasted.items.add(file("pasted.png"));
        document.getElementById("prompt").dispatchEvent(
            new ClipboardEvent("paste", {clipboardData: pasted, bubbles: true, cancelable: true}));
        return hint;""", base64.b64encode(_tiny_png()).decode())
    assert hint_shown  # the drop hint showed while dragging
    wait(lambda: len(browser.find_elements("css selector", "#attachments li")) == 2, what="two attachments")
    names = [i.get_attribute("alt") for i in browser.find_elements("css selector", "#attachments img")]
    assert names == ["attached: dropped.png", "attached: pasted.png"]
    assert by_id(browser, "drop-hint").get_attribute("hidden") is not None
    # Removing one by keyboard.
    browser.find_elements("css selector", "#attachments button")[0].send_keys(" ")
    wait(lambda: len(browser.find_elements("css selector", "#attachments li")) == 1, what="the removal")
    assert console_errors(browser) == []


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_readable_at_400_px(browser: Any, live: Server) -> None:
    browser.set_window_size(400, 800)
    try:
        open_page(browser, live)
        wait(lambda: ready(browser))
        width = browser.execute_script("return document.documentElement.scrollWidth")
        inner = browser.execute_script("return window.innerWidth")
        assert width <= inner  # no sideways scrolling
        for name in ("prompt", "add-image", "send"):
            element = by_id(browser, name)
            assert element.is_displayed() and element.rect["x"] + element.rect["width"] <= inner
        # Every control has a name a screen reader can read.
        unnamed = browser.execute_script("""
            return [...document.querySelectorAll('button, input:not([type=file]), textarea')]
              .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
              .map(e => e.id || e.outerHTML)""")
        assert unnamed == []
    finally:
        browser.set_window_size(1100, 1000)
