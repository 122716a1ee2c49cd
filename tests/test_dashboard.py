"""The web page at `/`, driven by a real headless browser (Debian's chromium and chromium-driver, through
Selenium; nothing is downloaded at run time): submit a clip, see its job reach done, open its timeline and check
that the chart drew one stacked band per track."""

from __future__ import annotations

import shutil

import pytest
from conftest import shared_path, wait_for
from test_serve import TOKEN, Api, start_server

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.fail("chromium and chromium-driver are needed (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_submit_on_the_page_and_read_the_timeline(browser, tmp_path):
    from selenium.webdriver.common.by import By

    proc, base = start_server(tmp_path, None)
    try:
        clip = str(shared_path("videos", "pyfeat_WolfgangLanger_Pexels.mp4"))
        browser.get(base + "/")
        browser.execute_script("localStorage.setItem('fervid-token', arguments[0])", TOKEN)
        browser.refresh()
        browser.find_element(By.ID, "path").send_keys(clip)
        fps = browser.find_element(By.ID, "fps")
        fps.clear()
        fps.send_keys("2")
        browser.find_element(By.ID, "submit-button").click()
        done = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, 'tr[data-status="done"] a'), 300,
                        "the job listed as done on the page", interval=0.5)  # fmt: skip
        browser.save_screenshot(str(tmp_path / "jobs.png"))
        job_id = int(done[0].text)
        done[0].click()
        tracks = Api(base).json("GET", f"/v1/jobs/{job_id}/series")["tracks"]
        assert tracks, "the clip has faces, so at least one track"
        charts = wait_for(lambda: (browser.execute_script("return window.fervidCharts.map(c => [c.track, c.series])")
                                   or None), 60, "the timeline charts drawn")  # fmt: skip
        assert sorted(t for t, _ in charts) == sorted(int(t) for t in tracks) and all(n == 7 for _, n in charts)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#charts .track canvas")) == len(tracks)
        assert "done" in browser.find_element(By.ID, "status").text
        assert browser.find_elements(By.CSS_SELECTOR, "#summary table")
        browser.save_screenshot(str(tmp_path / "job.png"))
        assert (tmp_path / "job.png").stat().st_size > 10_000
    finally:
        proc.terminate()
        proc.wait(timeout=60)
