"""`uip2p app` in a real browser: Debian's headless chromium, driven by selenium through
/usr/bin/chromedriver (`launch/setup.sh --test` installs both), against the page served in this
process with the embedded tiny model at 64 px and 2 steps."""

import io
import os
import pathlib
import socket
import tempfile
import urllib.request

import numpy as np
import pytest
from PIL import Image

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Headless as root on a machine without a display, GPU or network, and nothing fetched by the
# browser itself (updates, sync, safe browsing lists).
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,1400")
WAIT_S = 180  # generous: the first edit compiles, on a shared 2-core machine


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """The demo page on 127.0.0.1 (the embedded tiny model, 64 px, 2 steps): its URL."""
  with pytest.MonkeyPatch.context() as patch:
    # Uploads and outputs in the test's own folder, not /tmp/gradio.
    patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from uip2p_jax.app import build_app, launch
    from uip2p_jax.pipeline import EditPipeline
    app = build_app(EditPipeline.tiny_random(0), "the embedded tiny random model",
                    resolution=64, steps=2)
    port = free_port()
    launch(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
           quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser():
  from selenium import webdriver
  from selenium.webdriver.chrome.options import Options
  from selenium.webdriver.chrome.service import Service
  missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
  assert not missing, f"{missing} missing: run `bash launch/setup.sh --test` (Debian's chromium " \
                      "and chromium-driver)"
  options = Options()
  options.binary_location = CHROMIUM
  with tempfile.TemporaryDirectory() as profile:
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}",):
      options.add_argument(flag)
    # The driver's path given: selenium-manager (which would download one) is never run.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def test_edit_in_the_browser(server, browser, tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support import expected_conditions as ec
  from selenium.webdriver.support.ui import WebDriverWait
  from uip2p_jax.app import photo_examples
  wait = WebDriverWait(browser, WAIT_S)
  css = lambda selector: browser.find_element(By.CSS_SELECTOR, selector)
  status = lambda: css("#status").text
  photo = next(path for path, _ in photo_examples() if path.endswith("coffee.jpg"))

  def upload(path) -> None:
    """Sends `path` to the image input and waits until the page shows it (its file URL)."""
    css("#input-image input[type=file]").send_keys(str(path))
    name = os.path.basename(path)
    wait.until(lambda _: any((img.get_attribute("src") or "").endswith(name) for img in
                             browser.find_elements(By.CSS_SELECTOR, "#input-image img")))

  def edit(path) -> str:
    """Uploads `path`, clicks Edit and waits for a new edited image: its URL."""
    output = lambda: [img.get_attribute("src") for img in
                      browser.find_elements(By.CSS_SELECTOR, "#output-image img")]
    before = output()
    upload(path)
    css("#edit-button").click()
    wait.until(lambda _: output() not in ([], before) and status().startswith("Edited"))
    return output()[0]

  try:
    browser.get(server)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image input[type=file]")))
    # Offline: the page's scripts, styles and fonts all come from the app itself (no CDN).
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map(entry => entry.name)")
    assert resources and not [url for url in resources
                              if not url.startswith((server, "data:", "blob:"))], resources
    css("#instruction textarea").send_keys("make it snowy")
    src = edit(photo)
    # The first edit of this shape compiles, and the page said so.
    assert "including compiling it for this shape" in status(), status()
    with urllib.request.urlopen(src, timeout=30) as response:
      edited = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"), np.float32)
    original = np.asarray(Image.open(photo).convert("RGB").resize(edited.shape[1::-1]),
                          np.float32)
    assert edited.shape == (64, 64, 3)  # the working size: longest side 64 (432x288 in)
    assert np.abs(edited - original).mean() > 10  # the tiny random model's edit is noise

    # An unreadable upload: a message on the page, and the server keeps serving.
    fake = tmp_path / "not_an_image.png"
    fake.write_text("this is text, not a PNG")
    upload(fake)
    css("#edit-button").click()
    wait.until(lambda _: "Cannot read not_an_image.png as an image" in css("body").text)
    edit(photo)  # same shape: no compile
    assert "ran compiled" in status(), status()
  finally:
    screenshot = tmp_path / "app.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot of the page: {screenshot}")


def test_bad_input_messages_and_shapes_examples(tmp_path, monkeypatch):
  """Without a browser or a model: each bad input is a message for the page, and a ShapesWorld
  model's page adds the world's test scenes to the sample photos."""
  monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # the examples' copies
  import gradio as gr
  from uip2p_jax.app import Editor, build_app, photo_examples
  editor = Editor(pipe=None)  # every check below comes before the model is used
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(pathlib.Path(photo_examples()[0][0]).read_bytes()[:2000])  # cut short
  for image, instruction, message in [
      (None, "make it snowy", "Upload an image first"),
      (str(truncated), "   ", "Type an instruction first"),
      (str(truncated), "make it snowy", "Cannot read truncated.jpg as an image")]:
    with pytest.raises(gr.Error, match=message):
      next(editor.edit(image, instruction, 2, 7.5, 1.5, 0, False))
  app = build_app(None, "a ShapesWorld model", resolution=64, shapes=True)
  datasets = [block for block in app.blocks.values() if isinstance(block, gr.Dataset)]
  assert [len(d.samples) for d in datasets] == [8, 12]  # 8 scenes; 6 photos x 2 edits
  scene, instruction = datasets[0].samples[0]
  with Image.open(scene["path"]) as image:
    assert instruction and image.size == (64, 64)
