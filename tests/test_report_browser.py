"""The HTML report in a real headless browser (Debian's chromium): it renders, its images load, and it asks
for nothing outside the file.

Three looks at one report of the generated demo data (with predicted masks outlined), and one at the widest report
this package writes:
- a screenshot must show the page (not blank) with heatmap colours in it; it is kept as a CI artifact at
  build/report-screenshot.png (or under $CRD_FAST_ARTIFACTS);
- the page plus a read-only probe script reports how many of its <img> elements decoded (all must);
- chromium's network log must hold no request made by the page (chromium's own background requests have no
  page origin); a positive control page with one external image proves the check sees such a request.
Every src/href in the rendered DOM must be a data: URI or an in-page anchor.
- the widest report (the nearest-neighbour comparison, long category names, the label-free choice with both
  spatial models) must fit a 1200 px window: the document's scroll width is at most the window's width, every
  table ends inside it, and no cell or heading holds more than it shows; its screenshot is kept beside the other
  (report-wide-screenshot.png).
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crd_fast import CRDDetector
from crd_fast.evaluation.mvtec import evaluate_mvtec
from crd_fast.report import RunInfo, write_report
from crd_fast.synthetic import generate_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
REQUIRED = os.environ.get("CRD_FAST_REQUIRE_BROWSER") == "1"  # set by .ci/run, which installs chromium
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not REQUIRED,
    reason="chromium is not installed (apt-get install chromium; .ci/run installs it)",
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
PROBE = (
    '<script>window.addEventListener("load",function(){var im=document.images,ok=0;'
    "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}"
    'var p=document.createElement("pre");p.id="crd-probe";'
    "p.textContent=JSON.stringify({images:im.length,loaded:ok});document.body.appendChild(p);});</script>"
)
#: Measures, after load, how wide the page is and which elements hold more than they show.
LAYOUT_PROBE = (
    '<script>window.addEventListener("load",function(){var d=document.documentElement,clipped=[],tables=[];'
    'document.querySelectorAll("th,td,h1,h2,h3,p,figcaption,code,.name").forEach(function(e){'
    'if(e.scrollWidth>e.clientWidth+1)clipped.push(e.tagName+" "+e.textContent.slice(0,60));});'
    'document.querySelectorAll("table").forEach(function(t){tables.push(t.getBoundingClientRect().right);});'
    'var p=document.createElement("pre");p.id="crd-probe";p.textContent=JSON.stringify({scroll:d.scrollWidth,'
    "window:window.innerWidth,tables:tables,clipped:clipped});document.body.appendChild(p);});</script>"
)
#: The page width every report must fit.
PAGE_WIDTH = 1200
#: Category names as long as users give them: one unbroken identifier, one phrase.
LONG_NAMES = {
    "fabric": "fabric_" + "woven_textile_with_a_long_unbroken_category_identifier_" * 3,
    "cap": "bottle cap, front view, aligned under a ring light, second production line, night shift",
}
#: Browser-internal requests (component updates, accounts) carry this initiator; a page's requests carry its origin.
BROWSER_INITIATOR = "not an origin"


def artifact_dir() -> Path:
    return Path(os.environ.get("CRD_FAST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "build")


def chromium(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"  # a fresh profile every launch
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def page_requests(netlog: Path) -> list[str]:
    """URLs of the network requests the page made (from chromium's --log-net-log)."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        e["params"]["url"]
        for e in log["events"]
        if e["type"] == start and "url" in e.get("params", {}) and e["params"].get("initiator") != BROWSER_INITIATOR
    ]


class Links(HTMLParser):
    """Every URL-bearing attribute of the document."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action", "background") and value is not None:
                self.urls.append((tag, name, value))
            if name == "style" and value and "url(" in value:
                self.urls.append((tag, name, value))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    generate_dataset(tmp / "data", categories=("fabric",), n_train=10, n_test_good=4, n_test_defect=4, size=128, seed=0)
    det = CRDDetector(backbone="resnet18", weights="random", resize=128, crop=128)
    evals = evaluate_mvtec(det, tmp / "data", ["fabric"], progress=False, pixel_q=0.999)
    return write_report(tmp / "report", [e.result for e in evals]).html_path


@pytest.fixture(scope="module")
def wide_report(tmp_path_factory):
    """The widest content the report shows: NN comparison, long names, the choice between both spatial models."""
    tmp = tmp_path_factory.mktemp("wide")
    # 25 training images: every fifth is held out for the pixel threshold, and the 20 left are enough for the
    # label-free choice (crd_fast.selection.plan.MIN_IMAGES), which then compares the global and local models.
    generate_dataset(tmp / "data", categories=tuple(LONG_NAMES), n_train=25, n_test_good=4, n_test_defect=4, size=64)
    for short, long in LONG_NAMES.items():
        (tmp / "data" / short).rename(tmp / "data" / long)
    det = CRDDetector(backbone="resnet18", weights="random", resize=64, crop=64)
    evals = evaluate_mvtec(
        det, tmp / "data", list(LONG_NAMES.values()), progress=False, pixel_q=0.999, compare_nn_baseline=True
    )
    for e in evals:
        assert set(e.result.selection["families"]) == {"global", "local"} and e.result.extra["nn"]
    command = "crd-fast eval " + str(tmp / "data") + " --compare-nn --report " + str(tmp / "report")
    run = RunInfo(settings=det.config, weights=det.weights_description, command=command)
    return write_report(tmp / "report", [e.result for e in evals], run).html_path


@needs_chromium
def test_widest_report_fits_a_1200_px_page(wide_report, tmp_path):
    text = wide_report.read_text(encoding="utf-8")
    assert "nn.image_auroc" not in text and "head_ms_per_image" not in text  # readable names, not keys
    probe = tmp_path / "layout.html"
    probe.write_text(text.replace("</body>", LAYOUT_PROBE + "</body>"), encoding="utf-8")
    size = f"--window-size={PAGE_WIDTH},1800"
    dom = chromium(tmp_path, probe.as_uri(), size, "--virtual-time-budget=10000", "--dump-dom").stdout
    layout = json.loads(html.unescape(dom.split('id="crd-probe">', 1)[1].split("<", 1)[0]))
    assert layout["window"] == PAGE_WIDTH, layout
    assert layout["scroll"] <= layout["window"], layout
    assert len(layout["tables"]) >= 5 and max(layout["tables"]) <= layout["window"], layout
    assert layout["clipped"] == [], layout

    shot = artifact_dir() / "report-wide-screenshot.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    run = chromium(tmp_path, wide_report.as_uri(), f"--window-size={PAGE_WIDTH},2400", f"--screenshot={shot}")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2400, PAGE_WIDTH)


@needs_chromium
def test_report_renders_with_images_and_no_external_requests(report, tmp_path):
    shot = artifact_dir() / "report-screenshot.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    netlog = tmp_path / "netlog.json"
    run = chromium(
        tmp_path, report.as_uri(), "--window-size=1280,1800", f"--screenshot={shot}", f"--log-net-log={netlog}"
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1800, 1280)
    not_white = (pixels < 245).any(axis=2).mean()
    assert not_white > 0.05, f"the screenshot is (nearly) blank: {not_white:.3%} non-white"
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    heat = ((b > 150) & (r < 90)).sum() + ((r > 180) & (g < 90) & (b < 90)).sum()  # jet's blues and reds
    assert heat > 5000, "no heatmap colours on the screenshot: the overlay images did not render"
    assert page_requests(netlog) == []

    # Every <img> decodes (a read-only probe appended to a copy of the page counts them).
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium(tmp_path, probe.as_uri(), "--virtual-time-budget=10000", "--dump-dom").stdout
    counts = json.loads(dom.split('id="crd-probe">', 1)[1].split("<", 1)[0])
    assert counts["images"] >= 10 and counts["loaded"] == counts["images"], counts

    links = Links()
    links.feed(dom)
    assert links.urls, "no src/href found in the rendered page"
    outside = [
        (t, n, v[:80])
        for t, n, v in links.urls
        if not (v.startswith("data:image/") or (n == "href" and v.startswith("#")))
    ]
    assert outside == []


@needs_chromium
def test_the_network_check_sees_an_external_request(report, tmp_path):
    """Positive control: the same page with one external image is caught by ``page_requests``."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        report.read_text(encoding="utf-8").replace("</body>", '<img src="http://127.0.0.1:9/outside.png"></body>'),
        encoding="utf-8",
    )
    netlog = tmp_path / "netlog.json"
    run = chromium(tmp_path, bad.as_uri(), "--virtual-time-budget=5000", "--dump-dom", f"--log-net-log={netlog}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert page_requests(netlog) == ["http://127.0.0.1:9/outside.png"]
