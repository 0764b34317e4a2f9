"""Screenshots of the three tabs of `fmnist demo`, taken in headless Chromium (docs/demo_*.png).

    .venv/bin/python scripts/demo_screenshots.py --ckpt_path runs/base/version_0/checkpoints/best-07-0.9100.ckpt

Needs Debian's `chromium` and `chromium-driver` and Selenium (the dev extra); nothing is downloaded.
The browser test (tests/test_demo.py) drives the demo with the same functions.
"""

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

TABS = ("Try it", "Mistakes", "Runs")
READY = {
    "Try it": "The model sees",
    "Mistakes": "test images of class",
    "Runs": "/version_",
}  # text each tab shows once drawn
MAX_BYTES = 200_000  # per screenshot committed under docs/


def chromium_driver():
    """Headless Chromium through Selenium with the system's browser and driver; RuntimeError if missing."""
    from selenium import webdriver

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        raise RuntimeError("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def shown_size(browser, element_id: str) -> str:
    """`WxH` of the picture an element shows, as the browser decoded it; "" while there is none."""
    return browser.execute_script(
        "const image = document.querySelector(`#${arguments[0]} img`);"
        "return image && image.complete && image.naturalWidth ? `${image.naturalWidth}x${image.naturalHeight}` : '';",
        element_id,
    )


def capture(browser, url: str, picture: Path, out_dir: Path, prefix: str = "") -> dict[str, str]:
    """Upload `picture` in "Try it", then visit each tab (in Mistakes, click the gallery's first image); saves
    `{prefix}{tab}.png`; returns the prediction's text, each tab's, and the Grad-CAM pictures' sizes and note."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(url)
    wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
    browser.find_elements(By.CSS_SELECTOR, "input[type=file]")[0].send_keys(str(picture))

    def answered(page) -> bool:
        prediction = page.find_element(By.ID, "prediction").text
        done = "The model sees" in page.find_element(By.ID, "what-was-done").text
        return done and bool(prediction.strip()) and "processing" not in prediction  # not Gradio's spinner text

    wait.until(answered)
    wait.until(lambda page: shown_size(page, "gradcam"))
    texts = {"prediction": browser.find_element(By.ID, "prediction").text, "gradcam": shown_size(browser, "gradcam")}
    for tab in TABS:
        browser.find_element(By.XPATH, f"//button[@role='tab' and contains(., '{tab}')]").click()
        wait.until(lambda page, ready=READY[tab]: ready in page.find_element(By.TAG_NAME, "body").text)
        if tab == "Mistakes":  # where the model looks in the gallery's first (most confident) image
            wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "button.thumbnail-item")))
            browser.find_element(By.CSS_SELECTOR, "button.thumbnail-item").click()
            wait.until(lambda page: shown_size(page, "mistake-gradcam"))
            texts["mistake-gradcam"] = shown_size(browser, "mistake-gradcam")
            texts["mistake-gradcam-note"] = browser.find_element(By.ID, "mistake-gradcam-note").text
            browser.find_element(By.XPATH, "//button[@aria-label='Close' or @title='Close']").click()  # the grid again
            browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(1.5)  # let images and plots finish drawing
        browser.save_screenshot(str(out_dir / f"{prefix}{tab.lower().replace(' ', '_')}.png"))
        texts[tab] = browser.find_element(By.TAG_NAME, "body").text
    return texts


def photo_like(out: Path) -> Path:
    """A stand-in for a phone photo of a shoe: a real test sneaker, dark on white, 250x250 RGB."""
    from fmnist_lightning.data.datamodule import load_split

    test = load_split("data", train=False)
    sneaker = test.images[(test.labels == 7).nonzero()[0, 0], 0].numpy()
    large = np.asarray(Image.fromarray(255 - sneaker).resize((240, 240), Image.Resampling.BICUBIC))
    canvas = np.full((250, 250), 255, dtype=np.uint8)
    canvas[5:245, 5:245] = large
    Image.fromarray(canvas).convert("RGB").save(out)
    return out


def shrink(path: Path) -> int:
    """Re-save a screenshot with a palette (the page is flat colours), fewer colours until it fits MAX_BYTES."""
    screenshot = Image.open(path).convert("RGB")
    content = ImageOps.invert(screenshot).getbbox()  # drop the empty page below the content
    if content:
        screenshot = screenshot.crop((0, 0, screenshot.width, min(screenshot.height, content[3] + 24)))
    for colors in (128, 64, 32):
        screenshot.quantize(colors=colors).save(path, optimize=True)
        if path.stat().st_size <= MAX_BYTES:
            break
    return path.stat().st_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default="last")
    parser.add_argument("--out", default="docs", help="folder for demo_try_it.png, demo_mistakes.png, demo_runs.png")
    config = parser.parse_args(argv)
    out = Path(config.out)
    port = free_port()
    command = [sys.executable, "-m", "fmnist_lightning", "demo", "--ckpt_path", config.ckpt_path, "--port", str(port)]
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not serves(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the demo did not start")
            time.sleep(0.2)
        browser = chromium_driver()
        try:
            with tempfile.TemporaryDirectory() as scratch:
                capture(browser, url, photo_like(Path(scratch) / "shoe-photo.png"), out, prefix="demo_")
        finally:
            browser.quit()
    finally:
        server.terminate()
        server.wait(timeout=60)
    for tab in TABS:
        path = out / f"demo_{tab.lower().replace(' ', '_')}.png"
        size = shrink(path)
        print(f"{path}: {size:,} bytes" + ("" if size <= MAX_BYTES else f" (over {MAX_BYTES:,})"))


if __name__ == "__main__":
    main()
