"""End to end in a real browser: headless Chromium opens the page, picks an avatar, speaks a WAV through its fake
microphone and through the upload, and receives video frames that move (sampled from the <video> element).

Needs Debian's ``chromium`` + ``chromium-driver`` (``.ci/run`` installs them) and selenium; skips with the reason
when either is missing. :func:`drive_page` is also what ``bench/bench_serve.py`` runs for its screenshot.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from test_serve import wav_bytes  # noqa: F401
from test_streaming import avatars, speechlike  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                  "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--window-size=900,1100")

# Draws the <video> into a canvas and returns a 16x16 grey thumbnail (0..255) and the playback time.
_SAMPLE_JS = """
const v = document.getElementById('video');
if (!v || v.readyState < 2 || !v.videoWidth) return null;
const c = document.createElement('canvas'); c.width = 16; c.height = 16;
const g = c.getContext('2d'); g.drawImage(v, 0, 0, 16, 16);
const d = g.getImageData(0, 0, 16, 16).data; const out = [];
for (let i = 0; i < d.length; i += 4) out.push((d[i] + d[i + 1] + d[i + 2]) / 3);
return {thumb: out, t: v.currentTime, w: v.videoWidth, h: v.videoHeight};
"""


def browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements.txt)"
    for exe in ("chromium", "chromedriver"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (apt-get install chromium chromium-driver; .ci/run does it)"
    return None


def drive_page(base: str, avatar: str, mic_wav: Path, upload_wav: Path, screenshot: Path | None = None,
               seconds: float = 6.0) -> dict:
    """Open the page in headless Chromium with ``mic_wav`` as the microphone, connect to ``avatar`` with the mic
    on, upload ``upload_wav``; return thumbnails sampled from the video, the page's status, and the session."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    profile = tempfile.mkdtemp(prefix="talkinghead-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--use-file-for-fake-audio-capture={mic_wav}")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.get(base + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#avatar option")) > 0)
        Select(driver.find_element(By.ID, "avatar")).select_by_value(avatar)
        driver.find_element(By.ID, "mic").click()
        driver.find_element(By.ID, "connect").click()
        wait.until(lambda d: "connected" in d.find_element(By.ID, "status").text
                   or d.find_element(By.ID, "status").get_attribute("class") == "error")
        status = driver.find_element(By.ID, "status").text
        if "connected" not in status:
            return {"status": status, "samples": []}
        session = status.split()[1].rstrip(":")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(_SAMPLE_JS) is not None)
        samples = []
        end = time.monotonic() + seconds / 2
        while time.monotonic() < end:  # the microphone speaks
            samples.append(driver.execute_script(_SAMPLE_JS))
            time.sleep(0.25)
        driver.find_element(By.ID, "file").send_keys(str(upload_wav))
        driver.find_element(By.ID, "upload").click()
        WebDriverWait(driver, 30).until(lambda d: "speaking utterance" in d.find_element(By.ID, "status").text
                                        or d.find_element(By.ID, "status").get_attribute("class") == "error")
        upload_status = driver.find_element(By.ID, "status").text
        end = time.monotonic() + seconds / 2
        while time.monotonic() < end:  # the upload speaks
            samples.append(driver.execute_script(_SAMPLE_JS))
            time.sleep(0.25)
        if screenshot is not None:
            time.sleep(1.2)  # the page's stats box refreshes every second
            driver.save_screenshot(str(screenshot))
        import json

        stats_text = driver.find_element(By.ID, "stats").text
        return {"status": status, "upload_status": upload_status, "session": session,
                "samples": [s for s in samples if s], "stats": json.loads(stats_text) if stats_text else {}}
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def thumb_motion(samples: list[dict]) -> float:
    """Largest mean absolute difference (0..255) between the first thumbnail and the later ones."""
    th = [np.asarray(s["thumb"], np.float32) for s in samples]
    return max(float(np.abs(t - th[0]).mean()) for t in th[1:]) if len(th) > 1 else 0.0


@pytest.fixture(scope="module")
def browser_server(avatars):  # noqa: F811
    from talkinghead.methods.streaming import DrivenAvatar
    from talkinghead.serve.app import Server
    from talkinghead.serve.client import ServerThread

    why = browser_missing()
    if why:
        pytest.skip(why)
    server = Server([DrivenAvatar(avatars["gt"])], max_sessions=2)
    server.start_workers(1)
    thread = ServerThread(server).start()
    yield thread
    thread.stop()
    server.workers.shutdown(wait=True, cancel_futures=True)


def test_a_real_browser_speaks_through_mic_and_upload_and_sees_moving_frames(browser_server, tmp_path, clip):
    import soundfile

    from talkinghead.media import read_audio

    speech = read_audio(clip("speech_en_imagine_6s.wav"))[: 3 * 16000]
    mic = tmp_path / "mic.wav"
    soundfile.write(str(mic), speech, 16000, subtype="PCM_16")
    upload = tmp_path / "upload.wav"
    soundfile.write(str(upload), speechlike(1.5), 16000, subtype="PCM_16")
    server = browser_server.server
    res = drive_page(browser_server.base, "gt", mic, upload, screenshot=tmp_path / "page.png")
    assert "connected" in res["status"], res["status"]
    assert "speaking utterance" in res["upload_status"], res["upload_status"]
    samples = res["samples"]
    assert len(samples) >= 8 and samples[-1]["w"] == 64
    assert samples[-1]["t"] > samples[0]["t"]  # the video plays
    assert thumb_motion(samples) > 1.0  # and what it shows moves
    assert (tmp_path / "page.png").stat().st_size > 10_000
    stats = res["stats"]  # what the page showed: this session heard the microphone and played the upload
    assert stats["session"] == res["session"] and stats["mic"] and stats["first_frame_ms"] is not None
    # the page's session used the microphone; after the browser quit, its session is gone
    end = time.monotonic() + 30
    while server.sessions and time.monotonic() < end:
        time.sleep(0.25)
    assert not server.sessions
