"""Screenshot of the `captioner serve` page after captioning one image, in Debian's headless Chromium.

How docs/serve_page.png was made:

    python scripts/page_screenshot.py --checkpoint runs/syn600/best.pt --image /tmp/syn/val/000000000608.jpg \
        --out docs/serve_page.png --beam-size 3 --num-captions 3
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import Select, WebDriverWait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--beam-size", default="3")
    parser.add_argument("--num-captions", default="3")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()

    server = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--checkpoint", args.checkpoint,
                               "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE, text=True)
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1200",
                 "--hide-scrollbars"):
        options.add_argument(flag)
    browser = None
    try:
        url = re.search(r"http://\S+/", server.stdout.readline()).group(0)
        browser = webdriver.Chrome(options=options, service=Service(args.chromedriver))
        browser.get(url)
        WebDriverWait(browser, 60).until(lambda b: "decoder" in b.find_element("id", "model").text)
        Select(browser.find_element("id", "beam")).select_by_value(args.beam_size)
        Select(browser.find_element("id", "nbest")).select_by_value(args.num_captions)
        browser.find_element("id", "file").send_keys(args.image)
        WebDriverWait(browser, 120).until(lambda b: b.find_element("tag name", "body").get_attribute("data-state")
                                          in ("done", "error"))
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(
            "const i = document.getElementById('attention'); return i.hidden || (i.complete && i.naturalWidth > 0)"))
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1000, height + 160)  # the window's frame is counted in its size
        browser.save_screenshot(args.out)
        print("\n".join(item.text for item in browser.find_elements("css selector", "#captions li")))
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()


if __name__ == "__main__":
    main()
