"""`captioner serve`: the page in a real headless Chromium, the JSON API under 200 concurrent requests, limits."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import load_model
from captioner.cli import build_parser
from captioner.data.factory import evaluation_loader
from captioner.data.records import ImageRecord
from captioner.decoding import DecodeOptions
from captioner.engine import caption_batches
from captioner.multipart import MultipartError, parse_form
from captioner.ensemble import load_models
from captioner.errors import CaptionerError
from captioner.serve import CaptionService, Limits, RankingDefaults, make_server

REPO = Path(__file__).resolve().parents[1]


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """What a browser sends for a form: (body, Content-Type)."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, value in fields.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                      f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def post_caption(url: str, data: bytes, filename: str = "x.jpg", timeout: float = 120, **fields) -> tuple[int, dict]:
    body, content_type = multipart({k: str(v) for k, v in fields.items()}, {"image": (filename, data)})
    request = urllib.request.Request(url + "api/caption", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def direct_captions(checkpoint: Path, paths: list[Path], options: DecodeOptions) -> dict[str, list[tuple[str, float]]]:
    """Captions computed without the server, the way `captioner caption` does (one image per batch, as the
    server decodes them)."""
    model, tokenizer, cfg = load_model(checkpoint, "cpu")
    records = [ImageRecord(image_id=str(p), path=p, captions=()) for p in paths]
    loader = evaluation_loader(records, cfg.data.image_size, batch_size=1)
    return {batch.paths[0]: hyps[0]
            for batch, hyps in caption_batches(model, loader, tokenizer, torch.device("cpu"), options)}


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    """`captioner serve` as a user starts it, in its own process, on a free loopback port: yields its URL."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--checkpoint",
                                 str(trained_run / "best.pt"), "--port", "0", "--device", "cpu"],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        line = _first_line(proc, timeout=180)
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, f"no URL in the server's first line {line!r}; stderr: {log.read_text()}"
        yield match.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _first_line(proc, timeout: float) -> str:
    lines = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines and lines[0], f"the server printed nothing within {timeout}s (exit status {proc.poll()})"
    return lines[0]


def _find_chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists()
                                              else None)
    if not browser or not driver:
        pytest.skip("headless Chromium not found: install Debian's chromium and chromium-driver "
                    "(.ci/run does this with apt-get)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = _find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,1300"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield chrome
    chrome.quit()


def _wait_state(browser, states: tuple[str, ...], timeout: float = 120) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(lambda b: b.find_element("tag name", "body").get_attribute("data-state")
                                          in states)
    return browser.find_element("tag name", "body").get_attribute("data-state")


def test_page_in_headless_chromium_captions_an_upload_and_refuses_a_text_file(served, browser, trained_run,
                                                                            synthetic_dataset, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image = sorted(synthetic_dataset.val_images.iterdir())[0]
    expected = direct_captions(trained_run / "best.pt", [image], DecodeOptions(beam_size=3, num_return=2))
    browser.get(served)
    WebDriverWait(browser, 60).until(lambda b: "decoder" in b.find_element("id", "model").text)
    Select(browser.find_element("id", "beam")).select_by_value("3")
    Select(browser.find_element("id", "nbest")).select_by_value("2")
    browser.find_element("id", "file").send_keys(str(image))
    assert _wait_state(browser, ("done", "error")) == "done", browser.find_element("id", "error").text
    shown = [li.find_element("class name", "caption").text for li in browser.find_elements("css selector",
                                                                                            "#captions li")]
    assert shown == [text for text, _ in expected[str(image)]]
    scores = [float(li.find_element("class name", "score").text) for li in browser.find_elements("css selector",
                                                                                                 "#captions li")]
    assert scores == pytest.approx([score for _, score in expected[str(image)]], abs=2e-3)
    figure = browser.find_element("id", "attention")
    assert figure.is_displayed() and figure.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return document.getElementById('attention').naturalWidth") > 200

    # Dropping the same file on the drop zone captions it again, now greedily.
    Select(browser.find_element("id", "beam")).select_by_value("1")
    browser.execute_script("""
        const data = new DataTransfer();
        data.items.add(document.getElementById('file').files[0]);
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
    """)
    assert _wait_state(browser, ("done", "error")) == "done"
    greedy = direct_captions(trained_run / "best.pt", [image], DecodeOptions())
    assert [el.text for el in browser.find_elements("css selector", "#captions li .caption")] == \
        [greedy[str(image)][0][0]]

    # A text file: the page shows the server's message; the API answers 415 with it.
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    browser.find_element("id", "file").send_keys(str(text))
    assert _wait_state(browser, ("error",)) == "error"
    assert "notes.txt" in browser.find_element("id", "error").text
    assert "not an image" in browser.find_element("id", "error").text
    status, reply = post_caption(served, text.read_bytes(), filename="notes.txt")
    assert status == 415 and "notes.txt" in reply["error"]


def test_200_concurrent_api_requests_are_all_answered_correctly(served, trained_run, synthetic_dataset):
    images = sorted(synthetic_dataset.val_images.iterdir())[:8]
    expected = direct_captions(trained_run / "best.pt", images, DecodeOptions())
    payloads = [(str(p), p.read_bytes()) for p in images]
    start = threading.Barrier(200)

    def one(i: int):
        path, data = payloads[i % len(payloads)]
        start.wait(timeout=60)  # all 200 connect at once
        status, reply = post_caption(served, data, filename=Path(path).name, timeout=300)
        return path, status, reply

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(one, range(200)))
    seconds = time.perf_counter() - started
    assert len(results) == 200
    failures = [(path, status, reply) for path, status, reply in results if status != 200]
    assert not failures, failures[:3]
    for path, _, reply in results:
        (text, score), = expected[path]
        assert reply["captions"][0]["caption"] == text
        assert reply["captions"][0]["score"] == pytest.approx(score, abs=2e-3)
    print(f"200 concurrent requests answered in {seconds:.1f}s")


@pytest.fixture(scope="module")
def small_limits_server(trained_run):
    """An in-process server with tiny limits, for the refusals."""
    model, tokenizer, cfg = load_model(trained_run / "best.pt", "cpu")
    service = CaptionService(model, tokenizer, cfg.data.image_size, torch.device("cpu"))
    server = make_server(service, "127.0.0.1", 0, Limits(max_upload_bytes=60_000, max_pixels=320 * 240))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()


def _request(url: str, method: str = "GET", body: bytes | None = None, headers=None) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
            return response.status, json.loads(payload) if response.headers.get_content_type().endswith("json") \
                else payload.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_api_refusals_have_a_status_and_a_message(small_limits_server, synthetic_dataset, tmp_path):
    from PIL import Image

    url = small_limits_server
    jpeg = sorted(synthetic_dataset.val_images.iterdir())[0].read_bytes()  # 320x240
    status, reply = post_caption(url, jpeg, beam_size=2, num_captions=2, attention=1)
    assert status == 200 and len(reply["captions"]) == 2
    assert reply["image"] == {"name": "x.jpg", "width": 320, "height": 240}
    attention = reply["attention"]
    assert len(attention["words"]) == len(reply["captions"][0]["caption"].split())
    assert len(attention["maps"]) == len(attention["words"])
    assert all(abs(sum(map(sum, grid)) - 1) < 1e-2 for grid in attention["maps"])
    centres = attention["centres"]  # where each cell of a side sits, as a fraction of it: a client can draw the maps
    assert len(centres) == attention["grid"][0] == len(attention["maps"][0]) and centres == sorted(centres)
    assert 0 <= centres[0] < centres[-1] < 1

    big = tmp_path / "big.png"
    Image.new("RGB", (321, 240), (10, 200, 30)).save(big)  # one column over the pixel limit, few bytes
    status, reply = post_caption(url, big.read_bytes(), filename="big.png")
    assert status == 413 and "321x240" in reply["error"]
    status, reply = post_caption(url, os.urandom(70_000))
    assert status == 413 and "limit of 60000 bytes" in reply["error"]
    status, reply = post_caption(url, jpeg[: len(jpeg) // 2], filename="cut.jpg")
    assert status == 400 and "cut.jpg" in reply["error"] and "truncated" in reply["error"]
    status, reply = post_caption(url, b"", filename="empty.jpg")
    assert status == 400 and "empty" in reply["error"]
    status, reply = post_caption(url, jpeg, beam_size=2, num_captions=3)
    assert status == 400 and "num_captions" in reply["error"]
    status, reply = post_caption(url, jpeg, beam_size="many")
    assert status == 400 and "beam_size must be an integer" in reply["error"]
    status, reply = _request(url + "api/caption", "POST", b"image=1",
                             {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "multipart/form-data" in reply["error"]
    body, content_type = multipart({"beam_size": "1"}, {})
    status, reply = _request(url + "api/caption", "POST", body, {"Content-Type": content_type})
    assert status == 400 and "'image'" in reply["error"]
    assert _request(url + "api/caption")[0] == 405
    assert _request(url + "nowhere")[0] == 404
    status, health = _request(url + "api/health")
    assert status == 200 and health["max_pixels"] == 320 * 240 and health["decoder"] == "transformer"
    status, page = _request(url)
    assert status == 200 and 'id="file"' in page and "/api/caption" in page


@pytest.fixture(scope="module")
def ensemble_server(trained_run):
    """`serve --checkpoint A --checkpoint A --length-penalty 1 --no-repeat-ngram 1`, in process: yields its URL.
    An ensemble of a model with itself captions as that model does."""
    best = str(trained_run / "best.pt")
    args = build_parser().parse_args(["serve", "--checkpoint", best, "--checkpoint", best, "--length-penalty", "1",
                                      "--no-repeat-ngram", "1"])
    assert args.checkpoint == [best, best]
    model, tokenizer, cfg = load_models(args.checkpoint, "cpu")
    service = CaptionService(model, tokenizer, cfg.data.image_size, torch.device("cpu"),
                             checkpoint="+".join(args.checkpoint),
                             defaults=RankingDefaults(args.length_penalty, args.no_repeat_ngram))
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.url
    server.shutdown()
    server.server_close()


def _image_the_ban_changes(checkpoint: Path, paths: list[Path], beam_size: int, num_captions: int):
    """-> (an image whose captions the server's defaults change, its captions without them, with them)."""
    plain = direct_captions(checkpoint, paths, DecodeOptions(beam_size=beam_size, num_return=num_captions))
    banned = direct_captions(checkpoint, paths, DecodeOptions(beam_size=beam_size, num_return=num_captions,
                                                              length_penalty=1.0, no_repeat_ngram=1))
    changed = [p for p in paths if [c for c, _ in plain[str(p)]] != [c for c, _ in banned[str(p)]]]
    assert changed, "the tiny model repeats no word on any image: the checks would not see the ban"
    return changed[0], plain[str(changed[0])], banned[str(changed[0])]


def test_an_ensemble_server_ranks_with_its_defaults_or_the_request_settings_and_refuses_attention(
        ensemble_server, trained_run, synthetic_dataset):
    url, best = ensemble_server, trained_run / "best.pt"
    image, plain, banned = _image_the_ban_changes(best, sorted(synthetic_dataset.val_images.iterdir()), 3, 2)

    status, reply = post_caption(url, image.read_bytes(), beam_size=3, num_captions=2)
    assert status == 200 and (reply["length_penalty"], reply["no_repeat_ngram"]) == (1.0, 1)
    assert [c["caption"] for c in reply["captions"]] == [c for c, _ in banned]
    assert [c["score"] for c in reply["captions"]] == pytest.approx([s for _, s in banned], abs=2e-3)

    status, reply = post_caption(url, image.read_bytes(), beam_size=3, num_captions=2, length_penalty=0,
                                 no_repeat_ngram=0)
    assert status == 200 and (reply["length_penalty"], reply["no_repeat_ngram"]) == (0.0, 0)
    assert [c["caption"] for c in reply["captions"]] == [c for c, _ in plain]
    assert [c["score"] for c in reply["captions"]] == pytest.approx([s for _, s in plain], abs=2e-3)

    status, reply = post_caption(url, image.read_bytes(), attention=1)
    assert status == 400 and "ensemble of 2 checkpoints" in reply["error"]
    for field, value, message in (("length_penalty", "-1", "between 0 and 5"), ("length_penalty", "nan", "between"),
                                  ("no_repeat_ngram", "1.5", "must be an integer"),
                                  ("no_repeat_ngram", "11", "between 0 and 10")):
        status, reply = post_caption(url, image.read_bytes(), **{field: value})
        assert status == 400 and field in reply["error"] and message in reply["error"], (field, value, reply)
    status, health = _request(url + "api/health")
    assert status == 200 and health["models"] == 2 and health["attention"] is False
    assert health["decoder"] == "transformer+transformer" and health["checkpoint"] == f"{best}+{best}"
    assert (health["length_penalty"], health["no_repeat_ngram"]) == (1.0, 1)
    with pytest.raises(CaptionerError, match="--no-repeat-ngram must be between 0 and 10, got -1"):
        RankingDefaults(no_repeat_ngram=-1)


def test_page_of_an_ensemble_server_captions_without_attention(ensemble_server, browser, trained_run,
                                                               synthetic_dataset):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image, _, banned = _image_the_ban_changes(trained_run / "best.pt", sorted(synthetic_dataset.val_images.iterdir()),
                                              3, 1)
    browser.get(ensemble_server)
    WebDriverWait(browser, 60).until(lambda b: "ensemble of 2 checkpoints" in b.find_element("id", "model").text)
    checkbox = browser.find_element("id", "show-attention")
    assert not checkbox.is_enabled() and not checkbox.is_selected()
    Select(browser.find_element("id", "beam")).select_by_value("3")
    Select(browser.find_element("id", "nbest")).select_by_value("1")
    browser.find_element("id", "file").send_keys(str(image))
    assert _wait_state(browser, ("done", "error")) == "done", browser.find_element("id", "error").text
    assert [el.text for el in browser.find_elements("css selector", "#captions li .caption")] == [banned[0][0]]
    assert not browser.find_element("id", "attention").is_displayed()


def test_server_binds_loopback_by_default():
    args = build_parser().parse_args(["serve", "--checkpoint", "x.pt"])
    assert args.host == "127.0.0.1" and args.port == 8000


def test_an_ensemble_refuses_an_attention_layer_it_cannot_show(tmp_path, capsys):
    from captioner.cli import main

    missing = str(tmp_path / "absent.pt")  # refused before any checkpoint is read
    assert main(["serve", "--checkpoint", missing, "--checkpoint", missing, "--attention-layer", "0"]) == 2
    assert "--attention-layer: an ensemble of 2 checkpoints has no attention maps" in capsys.readouterr().err


def test_a_pixel_limit_beyond_what_the_image_loader_decodes_is_refused_at_start(tmp_path, capsys):
    """It could never take effect: every upload is decoded by the loader that refuses images above
    MAX_IMAGE_PIXELS, and such an image would be answered 400 rather than 413."""
    from captioner.cli import main
    from captioner.data.images import MAX_IMAGE_PIXELS

    missing = str(tmp_path / "absent.pt")  # refused before any checkpoint is read
    assert main(["serve", "--checkpoint", missing, "--max-pixels", str(MAX_IMAGE_PIXELS + 1)]) == 2
    assert (f"--max-pixels {MAX_IMAGE_PIXELS + 1} is above {MAX_IMAGE_PIXELS}, the most pixels this project "
            "decodes") in capsys.readouterr().err


def test_multipart_parser_keeps_bytes_exactly():
    data = b"\r\n--not-the-boundary\r\n\x00\xff" + bytes(range(256)) + b"\r\n"
    body, content_type = multipart({"beam_size": "3", "note": "é"}, {"image": ("a b.jpg", data)})
    form = parse_form(body, content_type)
    assert form["image"].data == data and form["image"].filename == "a b.jpg"
    assert form["beam_size"].data == b"3" and form["note"].data.decode() == "é"
    with pytest.raises(MultipartError, match="closing boundary"):
        parse_form(body[: len(body) // 2], content_type)
    with pytest.raises(MultipartError, match="boundary"):
        parse_form(body, "multipart/form-data")
