"""The HTTP API on Ray Serve, started on 127.0.0.1 by the tests: endpoints, storage, batching, overload, faults."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from helpers import KEY, METERED_KEY, WEBHOOK_SECRET, post, wait_until
from PIL import Image

from diffpano.io.manifest import read_manifest

STEPS = 2


def png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_tours_return_decodable_equirectangular_views(server):
    url, _ = server
    r = post(url, "/v1/tours", {"prompt": "a red bedroom", "num_views": 3, "num_inference_steps": STEPS, "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["views"]) == 3 and body["manifest_uri"] is None and body["model"]
    for i, view in enumerate(body["views"]):
        image = png(base64.b64decode(view["image_png_base64"]))
        assert view["view_index"] == i and image.shape == (view["height"], view["width"], 3)
        assert view["width"] == 2 * view["height"] and len(view["pose_c2w"]) == 16
    again = post(url, "/v1/tours", {"prompt": "a red bedroom", "num_views": 3, "num_inference_steps": STEPS,
                                    "seed": 5}).json()
    assert [v["image_png_base64"] for v in again["views"]] == [v["image_png_base64"] for v in body["views"]]


def test_tours_take_explicit_poses_per_view_prompts_and_trajectories(server):
    url, _ = server
    poses = [np.eye(4).reshape(16).tolist(), (np.eye(4) + np.pad(np.ones((3, 1)), ((0, 1), (3, 0)))).reshape(16)
             .tolist()]
    r = post(url, "/v1/tours", {"prompts": ["a kitchen", "a hallway"], "poses": poses, "num_inference_steps": STEPS})
    assert r.status_code == 200, r.text
    assert [v["prompt"] for v in r.json()["views"]] == ["a kitchen", "a hallway"]
    assert r.json()["views"][1]["pose_c2w"][3] == 1.0
    r = post(url, "/v1/tours", {"prompt": "an office", "num_views": 2, "num_inference_steps": STEPS,
                                "trajectory": {"kind": "orbit", "radius": 2.0}, "height": 32})
    assert r.status_code == 200, r.text
    assert r.json()["views"][0]["height"] == 32


def data_uri(image: np.ndarray) -> str:
    """An image as the data: URI a request gives a panorama by."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pattern(height: int, width: int) -> np.ndarray:
    """A 2:1 image of stripes and gradients: every pixel specific, and small as a PNG."""
    v, u = np.indices((height, width))
    return np.stack([u * 255 // width, v * 255 // height, (u // 4 + v // 3) % 2 * 200], -1).astype(np.uint8)


def test_a_tour_starts_from_panoramas_given_inline_returned_exactly(server):
    """images {"1": data URI}: view 1 comes back pixel for pixel (one at twice the size comes back resized)."""
    url, _ = server
    given, big = pattern(16, 32), pattern(32, 64)[::-1].copy()  # the test server takes bodies of 8 kB at most
    body = {"prompt": "a red bedroom", "num_views": 3, "num_inference_steps": STEPS, "seed": 5, "height": 16,
            "images": {"1": data_uri(given), "2": data_uri(big)}}
    r = post(url, "/v1/tours", body)
    assert r.status_code == 200, r.text
    views = [png(base64.b64decode(v["image_png_base64"])) for v in r.json()["views"]]
    assert np.array_equal(views[1], given)
    assert np.array_equal(views[2], np.asarray(Image.fromarray(big).resize((32, 16), Image.LANCZOS)))
    plain = post(url, "/v1/tours", body | {"images": None}).json()["views"]
    assert not np.array_equal(views[0], png(base64.b64decode(plain[0]["image_png_base64"])))  # steered by them


@pytest.mark.parametrize(("images", "message"), [
    ({"0": "s3://bucket/pano.png"}, "inline only"),
    ({"0": "/etc/passwd"}, "inline only"),
    ({"0": "data:image/png;base64,@@@"}, "not base64"),
    ({"0": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}, "not an image that can be decoded"),
    ({"0": data_uri(np.zeros((16, 16, 3), np.uint8))}, "2:1"),
    ({"5": data_uri(np.zeros((16, 32, 3), np.uint8))}, "outside the tour's 3 views"),
    ({"0": "panorama.png"}, "an absolute path"),
])
def test_given_panoramas_that_cannot_be_used_get_422_naming_the_view(server, images, message):
    r = post(server[0], "/v1/tours", {"prompt": "a", "num_views": 3, "images": images})
    assert r.status_code == 422 and "images" in r.text and message in r.text, r.text


def read_events(response: requests.Response, started: float) -> list[tuple[str, dict, float]]:
    """(event, data, seconds since `started`) of a text/event-stream answer, read as the events arrive."""
    events, name = [], None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: ")), time.perf_counter() - started))
    return events


def test_a_streamed_tour_reports_every_step_with_three_previews_then_the_same_tour(server):
    url, _ = server
    body = {"prompt": "a red bedroom", "num_views": 3, "num_inference_steps": 40, "seed": 5}
    started = time.perf_counter()
    with requests.post(url + "/v1/tours", json=body | {"stream": True}, headers={"X-API-Key": KEY}, stream=True,
                       timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r, started)
    kinds = [e for e, _, _ in events]
    assert kinds == ["progress"] * 40 + ["tour"], kinds
    progress = [d for e, d, _ in events if e == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 41)) and {p["steps"] for p in progress} == {40}
    tour = events[-1][1]
    assert {p["tour_id"] for p in progress} == {tour["tour_id"]}
    previews = [(p["step"], png(base64.b64decode(p["preview_png_base64"]))) for p in progress
                if "preview_png_base64" in p]
    assert [s for s, _ in previews] == [10, 20, 30]
    assert all(image.shape == (tour["views"][0]["height"], tour["views"][0]["width"], 3) for _, image in previews)
    first, whole = events[0][2], events[-1][2]
    assert first < 0.5 * whole, (first, whole)  # progress moves while the tour is generated, not at the end
    plain = post(url, "/v1/tours", body).json()
    assert [v["image_png_base64"] for v in tour["views"]] == [v["image_png_base64"] for v in plain["views"]]
    print(f"streamed 3-view tour, 40 steps: first progress {first:.2f}s, tour {whole:.2f}s")


def test_a_client_that_disconnects_stops_its_tour_and_a_streamed_panorama_ends_with_its_tour(server):
    url, _ = server
    cancelled = requests.get(url + "/v1/stats", headers={"X-API-Key": KEY}, timeout=30).json()["cancelled"]
    body = {"prompt": "a hallway", "num_views": 8, "num_inference_steps": 200, "seed": 1, "stream": True}
    started = time.perf_counter()
    with requests.post(url + "/v1/tours", json=body, headers={"X-API-Key": KEY}, stream=True, timeout=120) as r:
        assert next(line for line in r.iter_lines(decode_unicode=True) if line) == "event: progress"
    stopped = wait_until(lambda: requests.get(url + "/v1/stats", headers={"X-API-Key": KEY}, timeout=30).json()
                         ["cancelled"] > cancelled, "the disconnected tour to stop", timeout_s=60)
    assert stopped and time.perf_counter() - started < 60
    # The replica is free again at once: a short streamed panorama goes through, ending with its tour.
    with requests.post(url + "/v1/panoramas", json={"prompt": "a kitchen", "num_inference_steps": 3, "stream": True},
                       headers={"X-API-Key": KEY}, stream=True, timeout=60) as r:
        events = read_events(r, time.perf_counter())
    assert [e for e, _, _ in events] == ["progress"] * 3 + ["tour"]
    assert len(events[-1][1]["views"]) == 1
    refused = post(url, "/v1/tours", {"prompt": "a", "num_views": 2, "stream": True, "height": 1024})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "height"]  # before streaming


def test_a_tour_with_more_views_than_a_batch_is_generated(server):
    """The fixture's batches hold 8 views; a 12-view tour runs alone (windowed) instead of failing."""
    url, _ = server
    r = post(url, "/v1/tours", {"prompt": "a long hallway", "num_views": 12, "num_inference_steps": 1, "seed": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["views"]) == 12


def test_a_request_chooses_its_scheduler_and_its_seed_still_reproduces_the_tour(server):
    """euler-a draws noise at every step: the same seed gives the same tour, another scheduler another tour."""
    url, _ = server
    body = {"prompt": "a blue office", "num_views": 2, "num_inference_steps": STEPS, "seed": 9}
    views = {}
    for name in ("euler-a", "euler-a", "ddim"):
        r = post(url, "/v1/tours", body | {"scheduler": name})
        assert r.status_code == 200, r.text
        assert (r.json()["seed"], r.json()["scheduler"]) == (9, name)
        views.setdefault(name, []).append([v["image_png_base64"] for v in r.json()["views"]])
    assert views["euler-a"][0] == views["euler-a"][1]
    assert views["euler-a"][0] != views["ddim"][0]
    r = post(url, "/v1/tours", body | {"scheduler": "plms"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "scheduler"]


def test_panorama_is_one_png(server):
    url, _ = server
    r = post(url, "/v1/panoramas", {"prompt": "a blue office", "num_inference_steps": STEPS})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = png(r.content)
    assert image.shape[1] == 2 * image.shape[0]


def test_stored_tours_land_in_the_manifest_and_load_by_id(server):
    url, out = server
    r = post(url, "/v1/tours", {"prompt": "a green kitchen", "num_views": 2, "num_inference_steps": STEPS,
                                "output": "store"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["manifest_uri"] and all(v["image_uri"] and v["image_png_base64"] is None for v in body["views"])
    table = read_manifest(str(out)).to_pandas()
    rows = table[table.tour_id == body["tour_id"]]
    assert sorted(rows.view_index) == [0, 1] and set(rows.prompt) == {"a green kitchen"}
    assert set(rows.scheduler) == {"ddim"}  # the sampler that made it: the tiny model's own
    loaded = requests.get(f"{url}/v1/tours/{body['tour_id']}", headers={"X-API-Key": KEY}, timeout=30)
    assert loaded.status_code == 200 and len(loaded.json()["views"]) == 2
    assert body["scheduler"] == loaded.json()["scheduler"] == "ddim" and body["seed"] == loaded.json()["seed"]
    assert requests.get(f"{url}/v1/tours/nope", headers={"X-API-Key": KEY}, timeout=30).status_code == 404
    assert requests.get(f"{url}/v1/tours/..%2Fx", headers={"X-API-Key": KEY}, timeout=30).status_code in (404, 422)


def stats(url: str) -> dict:
    return requests.get(f"{url}/v1/stats", headers={"X-API-Key": KEY}, timeout=30).json()


def test_concurrent_requests_are_batched_by_views(server):
    url, _ = server
    before = stats(url)["batches"]
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda i: post(url, "/v1/tours", {"prompt": f"room {i}", "num_views": 1,
                                                                "num_inference_steps": STEPS}).status_code,
                              range(6)))
    assert codes == [200] * 6
    after = stats(url)
    new = after["batch_views"][len(after["batch_views"]) - (after["batches"] - before):]
    assert sum(new) == 6 and max(new) > 1, new  # these six tours, and some of them shared a batch


def test_a_burst_beyond_capacity_gets_quick_503s_and_the_server_recovers(server):
    url, _ = server
    body = {"prompt": "a burst", "num_views": 4, "num_inference_steps": STEPS, "height": 32}  # capacity, not cost

    def one(_):
        started = time.perf_counter()
        r = post(url, "/v1/tours", body, timeout=90)
        return r.status_code, time.perf_counter() - started, r.headers.get("retry-after")

    with ThreadPoolExecutor(48) as pool:  # twice what two ingress replicas' handles hold (8 running + 2 x 4 queued)
        results = list(pool.map(one, range(48)))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    rejected = [(t, ra) for c, t, ra in results if c == 503]
    assert all(ra for _, ra in rejected)
    # quick: the first refusal comes before any accepted tour is done (no waiting on the model for a 503)
    assert min(t for t, _ in rejected) < min(t for c, t, _ in results if c == 200)
    r = post(url, "/v1/tours", {"prompt": "after", "num_views": 1, "num_inference_steps": STEPS})
    assert r.status_code == 200


def test_a_killed_model_replica_is_replaced(server):
    import ray

    url, _ = server
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "PanoGenerator" in a["name"]]
    assert replicas, ray.util.list_named_actors(all_namespaces=True)
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    deadline = time.monotonic() + 90
    while True:
        r = post(url, "/v1/tours", {"prompt": "after a crash", "num_views": 1, "num_inference_steps": STEPS})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        assert r.status_code == 503, r.text  # unavailable while replaced, never a 500
        time.sleep(1)
    assert r.status_code == 200


POSE = np.eye(4).reshape(16).tolist()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"prompt": "a", "prompts": ["b"]}, "prompt"),
        ({"prompt": "a", "num_views": 17}, "num_views"),
        ({"prompt": "a", "num_views": 0}, "num_views"),
        ({"prompt": "a", "num_views": "four"}, "num_views"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a", "poses": [POSE[:15]]}, "poses"),
        ({"prompt": "a", "poses": [[*POSE[:15], "nan"]]}, "poses"),
        ({"prompt": "a", "poses": [[2.0, *POSE[1:]]]}, "poses"),
        ({"prompt": "a", "poses": [[-1.0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]]}, "poses"),
        ({"prompt": "a", "poses": [POSE], "num_views": 2}, "num_views"),
        ({"prompt": "a", "poses": [POSE], "trajectory": {"kind": "walk"}}, "trajectory"),
        ({"prompt": "a", "trajectory": {"kind": "spiral"}}, "trajectory"),
        ({"prompt": "a", "trajectory": {"kind": "walk", "speed": 3}}, "trajectory"),
        ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "seed": 2**64}, "seed"),
        ({"prompt": "a", "height": 30}, "height"),
        ({"prompt": "a", "height": 32, "width": 48}, "width"),
        ({"prompt": "a", "height": 128}, "height"),
        ({"prompt": "a", "output": "disk"}, "output"),
        ({"prompt": "a", "colour": "red"}, "colour"),
    ],
)
def test_bad_tour_requests_get_422_naming_the_field(server, body, field):
    r = post(server[0], "/v1/tours", body)
    assert r.status_code == 422, (r.status_code, r.text)
    assert field in r.text


def test_bad_bodies_and_keys_get_4xx_not_5xx(server):
    url, _ = server
    assert post(url, "/v1/tours", {"prompt": "a" * 900, "prompts": ["b" * 900] * 16}).status_code == 413
    r = requests.post(url + "/v1/tours", data=b"{not json", headers={"X-API-Key": KEY,
                                                                     "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422
    r = requests.post(url + "/v1/tours", data=b"[1, 2]", headers={"X-API-Key": KEY,
                                                                   "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422
    assert post(url, "/v1/panoramas", {"prompt": "a", "poses": [POSE]}).status_code == 422
    assert post(url, "/v1/tours", {"prompt": "a"}, key=None).status_code == 401
    assert post(url, "/v1/tours", {"prompt": "a"}, key="wrong").status_code == 401
    assert requests.get(url + "/v1/stats", timeout=30).status_code == 401


def test_health_docs_and_viewer_are_served(server):
    url, _ = server
    health = requests.get(url + "/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    spec = requests.get(url + "/openapi.json", timeout=30).json()
    assert {"/v1/tours", "/v1/panoramas", "/healthz", "/viewer"} <= set(spec["paths"])
    assert "TourRequest" in str(spec)
    page = requests.get(url + "/viewer", timeout=30)
    assert page.status_code == 200 and "<canvas" in page.text and "http" not in page.text.split("<script")[1][:40]
    assert "atan2" in requests.get(url + "/viewer/viewer.js", timeout=30).text


@pytest.fixture(scope="module")
def chromium():
    """Debian's headless Chromium and its driver, which `make install` installs (a test installs nothing)."""
    import shutil

    found = shutil.which("chromium"), shutil.which("chromedriver")
    assert all(found), "chromium and chromedriver are missing: run make install (apt-get install chromium-driver)"
    return found


CANVAS_STATS = """
const c = document.getElementById('view');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let sum = 0, sq = 0, n = 0;
for (let i = 0; i < d.length; i += 16) { const g = d[i] + d[i + 1] + d[i + 2]; sum += g; sq += g * g; n++; }
return [sum / n, Math.sqrt(sq / n - (sum / n) ** 2)];
"""

# Zoomed in (fov 40) so that one panorama texel covers tens of screen pixels: the share of horizontal neighbours
# that are exactly equal (1 for blocks of nearest-neighbour sampling), and the mean colour step between each pair of
# columns around the centre, where yaw = pi puts the panorama's seam.
ZOOMED_STATS = """
const v = window.diffpanoViewer; v.state.fov = 40; v.state.yaw = Math.PI; v.state.pitch = 0; v.draw();
const c = document.getElementById('view'), w = c.width, h = c.height;
const d = c.getContext('2d').getImageData(0, 0, w, h).data;
let equal = 0, pairs = 0;
const step = new Array(w - 1).fill(0);
for (let j = 0; j < h; j++) for (let i = 0; i + 1 < w; i++) {
  const a = (j * w + i) * 4, b = a + 4;
  if (d[a] === d[b] && d[a + 1] === d[b + 1] && d[a + 2] === d[b + 2]) equal++;
  pairs++;
  step[i] += (Math.abs(d[a] - d[b]) + Math.abs(d[a + 1] - d[b + 1]) + Math.abs(d[a + 2] - d[b + 2])) / h;
}
return [equal / pairs, step];
"""


def headless_chrome(chromium):
    """A headless Chromium driven by selenium, its console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(chromium[1]), options=options)


def open_tour(driver, url: str, tour_id: str) -> None:
    """Open a tour in the viewer with the test key and wait until its views are loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/viewer")
    driver.execute_script("sessionStorage.setItem('diffpano-key', arguments[0])", KEY)
    driver.get(f"{url}/viewer?tour={tour_id}")
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return window.diffpanoViewer.state.views.length"))


def test_api_docs_render_from_the_servers_own_assets(server, chromium):
    """/docs and /redoc load Swagger UI and ReDoc from the server (no CDN: this machine has no internet), so the
    page lists the API's operations instead of staying blank."""
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    page = requests.get(f"{url}/docs", timeout=30).text
    assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        r = requests.get(f"{url}/docs-assets/{asset}", timeout=30)
        assert r.status_code == 200 and len(r.content) > 100_000, asset
    assert "/docs-assets/redoc.standalone.js" in requests.get(f"{url}/redoc", timeout=30).text
    driver = headless_chrome(chromium)
    try:
        driver.get(f"{url}/docs")
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return document.querySelectorAll('.opblock').length"))
        paths = driver.execute_script(
            "return [...document.querySelectorAll('.opblock-summary-path')].map(e => e.textContent)")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert "/v1/tours" in paths and errors == []


def test_viewer_draws_a_stored_tour_smoothly_in_headless_chromium_without_console_errors(server, chromium):

    url, _ = server
    tour = post(url, "/v1/tours", {"prompt": "a yellow living room", "num_views": 2, "num_inference_steps": STEPS,
                                   "output": "store", "height": 64}).json()["tour_id"]
    driver = headless_chrome(chromium)
    try:
        open_tour(driver, url, tour)
        opened = driver.execute_script("""const v = window.diffpanoViewer, o = document.getElementById('overview');
            const start = v.state.fov; v.zoomTo(10); const narrowest = v.state.fov;
            return [start, narrowest, v.minFov(), document.getElementById('tourid').value, o.hidden,
                    o.naturalWidth, o.naturalHeight];""")
        stats = driver.execute_script(CANVAS_STATS)
        before = driver.execute_script("return document.getElementById('index').textContent")
        driver.find_element("id", "next").click()
        after = driver.execute_script("return document.getElementById('index').textContent")
        equal_share, column_steps = driver.execute_script(ZOOMED_STATS)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert errors == []
    start, narrowest, min_fov, box, hidden, ow, oh = opened
    # 64x128 on a 960-column canvas: 4 pixels a texel allows no zoom below 120 degrees; the start is wide (>= 110)
    assert start >= 110 and narrowest == min_fov == 120, opened
    assert box == tour and not hidden and (ow, oh) == (128, 64)  # the id box filled, the whole panorama shown
    assert stats[1] > 5.0, stats  # not a blank or constant canvas
    assert before == "view 1 / 2" and after == "view 2 / 2"
    # 64x128 at fov 40 on 960 columns: a texel spans ~67 columns, so nearest sampling leaves ~98% equal neighbours.
    assert equal_share < 0.5, equal_share
    centre = len(column_steps) // 2
    around = column_steps[centre - 40:centre - 2] + column_steps[centre + 2:centre + 40]
    assert column_steps[centre] <= 1.5 * max(around) + 1.0, (column_steps[centre], max(around))  # no seam line


def test_the_viewers_generate_button_shows_progress_and_previews_before_the_tour(server, chromium):
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    driver = headless_chrome(chromium)
    try:
        driver.get(f"{url}/viewer")
        driver.execute_script("sessionStorage.setItem('diffpano-key', arguments[0])", KEY)
        driver.execute_script("""window.seen = [];
            const note = () => window.seen.push([document.getElementById('status').textContent,
                                                 document.getElementById('overview').src.length,
                                                 window.diffpanoViewer.state.views.length]);
            new MutationObserver(note).observe(document.getElementById('status'), {childList: true});
            new MutationObserver(note).observe(document.getElementById('overview'), {attributes: true});
            document.getElementById('text').value = 'a green kitchen';
            document.getElementById('views').value = '2';
            document.getElementById('steps').value = '40';
            document.getElementById('generate').click();""")
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return window.diffpanoViewer.state.views.length"))
        seen = driver.execute_script("return window.seen")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert errors == []
    steps = [text for text, _, views in seen if text.startswith("step ") and views == 0]
    assert "step 1 / 40" in steps and "step 39 / 40" in steps, seen  # the bar moved while the tour was made
    assert any(src > 100 and views == 0 for _, src, views in seen), seen  # a preview showed before the tour
    assert "2 views" in seen[-1][0], seen[-1]  # then the tour itself


def test_packaged_serve_config_is_valid_and_uses_current_keys():
    from ray.serve.config import AutoscalingConfig

    from serve.ingress import ServerSettings
    from serve.run import load_config

    config = load_config(None, {"model": "/models/x", "compile": None})
    app = config.applications[0]
    assert app.import_path == "serve.app:build_app" and app.args["model"] == "/models/x"
    assert ServerSettings.model_validate(app.args).compile == "off"  # the packaged default
    compiled = load_config(None, {"compile": "reduce-overhead"}).applications[0].args  # `diffpano serve --compile`
    assert ServerSettings.model_validate(compiled).compile == "reduce-overhead"
    assert next(d for d in app.deployments if d.name == "DiffPanoAPI").num_replicas >= 2  # tests/test_serve_scaleout.py
    generator = next(d for d in app.deployments if d.name == "PanoGenerator")
    scaling = generator.autoscaling_config
    assert set(scaling) <= set(AutoscalingConfig.model_fields)  # no stale key silently ignored
    assert AutoscalingConfig(**scaling).min_replicas >= 1
    assert generator.max_queued_requests > 0 and config.http_options.request_timeout_s


def job_status(url: str, job_id: str) -> dict:
    return requests.get(f"{url}/v1/jobs/{job_id}", headers={"X-API-Key": KEY}, timeout=30).json()


def wait_job(url: str, job_id: str, until=lambda s: s["state"] in ("done", "failed", "cancelled"),
             timeout: float = 180) -> dict:
    """Poll the job until `until(status)` holds; the last status (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    while not until(status := job_status(url, job_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return status


def test_an_online_job_completes_while_interactive_requests_are_answered(server):
    url, out = server
    specs = [{"tour_id": f"job-a-{i}", "prompt": f"room {i}", "num_views": 2, "num_inference_steps": 6}
             for i in range(30)]
    r = post(url, "/v1/jobs", {"specs": specs, "output": "jobs/a"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["tours_total"] == 30
    started = wait_job(url, job["job_id"], until=lambda s: s["tours_done"] >= 1)
    assert started["state"] == "running", started
    interactive = post(url, "/v1/tours", {"prompt": "meanwhile", "num_views": 1, "num_inference_steps": STEPS})
    during = job_status(url, job["job_id"])
    assert interactive.status_code == 200, interactive.text
    assert during["state"] == "running" and during["tours_done"] < 30, during  # answered while the job ran
    status = wait_job(url, job["job_id"])
    assert status["state"] == "done" and status["tours_done"] == 30 and status["tours_failed"] == 0, status
    table = read_manifest(str(out / "jobs" / "a")).to_pandas()
    assert sorted(table.tour_id.unique()) == sorted(s["tour_id"] for s in specs) and len(table) == 60
    again = post(url, "/v1/jobs", {"specs": specs, "output": "jobs/a"}).json()  # same output: nothing redone
    assert wait_job(url, again["job_id"])["tours_done"] == 30
    assert len(read_manifest(str(out / "jobs" / "a"))) == 60


def test_a_cancelled_job_leaves_only_complete_tours(server):
    url, out = server
    specs = [{"tour_id": f"job-c-{i}", "prompt": "a long job", "num_views": 3, "num_inference_steps": 10}
             for i in range(40)]
    job = post(url, "/v1/jobs", {"specs": specs, "output": "jobs/c"}).json()
    wait_job(url, job["job_id"], until=lambda s: s["tours_done"] >= 1)
    r = requests.delete(f"{url}/v1/jobs/{job['job_id']}", headers={"X-API-Key": KEY}, timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    status = wait_job(url, job["job_id"], until=lambda s: s["tours_running"] == 0)  # tours in flight finish
    assert status["state"] == "cancelled" and status["tours_running"] == 0 and 1 <= status["tours_done"] < 40
    table = read_manifest(str(out / "jobs" / "c")).to_pandas()
    assert (table.groupby("tour_id").size() == 3).all(), table.groupby("tour_id").size()  # whole tours only
    assert table.tour_id.nunique() == status["tours_done"]  # every finished tour, and nothing after the cancel


def test_tours_an_online_job_wrote_load_by_id_and_open_in_the_viewer(server, chromium):
    """A job's default output is OUTPUT_ROOT/jobs/<job_id>, not the root's manifest: both ingress replicas find its
    tours there, and the viewer opens one by id."""

    from serve.ingress import REPLICA_HEADER

    url, out = server
    specs = [{"tour_id": f"job-v-{i}", "prompt": "a blue attic", "num_views": 2, "num_inference_steps": STEPS,
              "height": 64} for i in range(2)]
    job = post(url, "/v1/jobs", {"specs": specs}).json()
    assert wait_job(url, job["job_id"])["state"] == "done"
    assert job["manifest_uri"] == f"{out}/jobs/{job['job_id']}/manifest"
    answered: set[str] = set()

    def loaded_by_both() -> bool:
        r = requests.get(f"{url}/v1/tours/job-v-1", headers={"X-API-Key": KEY}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["manifest_uri"] == job["manifest_uri"] and len(r.json()["views"]) == 2
        answered.add(r.headers[REPLICA_HEADER])
        return len(answered) == 2

    wait_until(loaded_by_both, "both ingress replicas to load the tour", 60)
    driver = headless_chrome(chromium)
    try:
        open_tour(driver, url, "job-v-1")
        shown = driver.execute_script("return [window.diffpanoViewer.state.views.length, "
                                      "document.getElementById('tourid').value]")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert shown == [2, "job-v-1"] and errors == [], (shown, errors)


@pytest.mark.parametrize(("body", "field"), [
    ({"specs": [{"tour_id": "a b", "prompt": "x"}]}, "line 1: tour_id"),
    ({"specs": [{"tour_id": "a", "prompt": "x", "num_views": 99}]}, "num_views"),
    ({"specs": [{"tour_id": "a", "prompt": "x", "images": {"0": "s3://b/p.png"}}]}, "line 1: images.0"),
    ({"specs": [{"tour_id": "a", "prompt": "x"}], "output": "../escape"}, "output"),
    ({"specs": [{"tour_id": "a", "prompt": "x"}], "output": "/abs"}, "output"),
    ({}, "specs"),
    ({"specs": []}, "specs"),
])
def test_bad_jobs_get_422(server, body, field):
    r = post(server[0], "/v1/jobs", body)
    assert r.status_code == 422 and field in r.text, r.text
    assert requests.get(f"{server[0]}/v1/jobs/nope", headers={"X-API-Key": KEY}, timeout=30).status_code == 404


def test_diffpano_bulk_submits_to_the_endpoint_and_follows_the_job(server):
    from typer.testing import CliRunner

    from diffpano.cli import build_app

    app = build_app()

    url, out = server
    result = CliRunner().invoke(app, ["bulk", "--synthetic", "3", "--views", "2", "--steps", "2", "--endpoint", url,
                                      "--out", "jobs/cli"], env={"DIFFPANO_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert "done: 3 tours done, 0 failed of 3" in result.output
    assert read_manifest(str(out / "jobs" / "cli")).to_pandas().tour_id.nunique() == 3


@pytest.mark.slow
@pytest.mark.serve
def test_diffpano_serve_stops_cleanly_on_sigterm(tiny_model_dir, tmp_path):
    """How services are stopped (systemd, Kubernetes, kill): a SIGTERM ends `diffpano serve` with "shutting down",
    exit 0 and no fatal-signal stack dump."""
    import os
    import signal
    import subprocess
    import sys

    from helpers import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "diffpano.cli", "serve", "--port", str(port), "--model", str(tiny_model_dir),
           "--output-root", str(tmp_path / "out")]
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 240
    for line in proc.stdout:  # the server says where it listens once it is up
        lines.append(line)
        if "DiffPano API at" in line or time.monotonic() > deadline:
            break
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200, "".join(lines[-20:])
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 0 and "shutting down" in output, output[-3000:]
    assert "SIGTERM received" not in output and "Traceback" not in output, output[-3000:]


class Receiver:
    """A webhook receiver on 127.0.0.1: records every delivery (headers, body) and answers 500 to the first `fail`."""

    def __init__(self, fail: int = 1) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.deliveries: list[tuple[dict, bytes, float]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body, time.time()))
                self.send_response(500 if len(receiver.deliveries) <= fail else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/hooks/diffpano"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()


def verified(headers: dict, body: bytes) -> bool:
    """Standard Webhooks: v1 = base64 HMAC-SHA256, keyed by the secret's base64 part, of "id.timestamp.body"."""
    import hashlib
    import hmac

    key = base64.b64decode(WEBHOOK_SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(headers["webhook-signature"], expected)


def test_a_jobs_webhook_gets_signed_start_progress_and_completed_retried_after_a_failure(server):
    url, _ = server
    receiver = Receiver(fail=1)
    try:
        specs = [{"tour_id": f"hook-{i}", "prompt": f"room {i}", "num_views": 2, "num_inference_steps": 30}
                 for i in range(12)]
        r = post(url, "/v1/jobs", {"specs": specs, "output": "jobs/hooked", "webhook": receiver.url})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        status = wait_job(url, job_id, until=lambda s: s["state"] == "done" and any(
            json.loads(b)["type"] == "job.completed" for h, b, _ in receiver.deliveries[1:]))
    finally:
        receiver.close()
    deliveries = receiver.deliveries
    assert all(verified(h, b) for h, b, _ in deliveries)
    assert all(abs(int(h["webhook-timestamp"]) - t) <= 5 for h, _, t in deliveries)
    first, retried = deliveries[0][0]["webhook-id"], deliveries[1][0]["webhook-id"]
    assert first == retried  # the failed delivery came again, with the same id
    events = [json.loads(b) for _, b, _ in deliveries[1:]]
    types = [e["type"] for e in events]
    assert types[0] == "job.start" and types[-1] == "job.completed" and set(types[1:-1]) <= {"job.progress"}, types
    assert len({h["webhook-id"] for h, _, _ in deliveries}) == len(deliveries) - 1
    progress_times = [t for (h, b, t) in deliveries[1:] if json.loads(b)["type"] == "job.progress"]
    assert all(b - a >= 1.9 for a, b in zip(progress_times, progress_times[1:], strict=False)), progress_times
    done = events[-1]["data"]
    assert done["job_id"] == job_id and done["state"] == "done" and done["tours_done"] == 12
    assert status["webhook_failures"] == 1 and done["webhook_failures"] == 1
    print(f"webhook: {len(progress_times)} progress events; first attempt failed, delivered on the retry "
          f"{deliveries[1][2] - deliveries[0][2]:.2f}s later")


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"webhook": "http://169.254.169.254/latest/meta-data"}, "webhook", "not in the server's webhook_allow"),
    ({"webhook": "file:///etc/passwd"}, "webhook", "http:// or https://"),
    ({"webhook": "http://user:secret@127.0.0.1:9/x"}, "webhook", "credentials"),
    ({"webhook_events": ["completed"]}, "webhook_events", "without a webhook"),
    ({"webhook": "http://127.0.0.1:9/x", "webhook_events": ["finished"]}, "webhook_events", ""),
])
def test_webhooks_the_server_will_not_call_get_422_naming_the_field(server, body, field, message):
    r = post(server[0], "/v1/jobs", {"specs": [{"prompt": "a", "num_views": 2}], **body})
    assert r.status_code == 422 and field in json.dumps(r.json()["detail"]) and message in r.text, r.text


def test_webhook_settings_are_checked_and_none_are_allowed_by_default(monkeypatch):
    from pydantic import ValidationError

    from serve.ingress import ServerSettings
    from serve.webhooks import url_problem

    with pytest.raises(ValidationError, match="webhook_secret"):
        ServerSettings(webhook_secret="not-a-secret")
    monkeypatch.delenv("DIFFPANO_WEBHOOK_ALLOW", raising=False)
    assert ServerSettings().webhook_hosts() == []
    monkeypatch.setenv("DIFFPANO_WEBHOOK_ALLOW", "hooks.example.com, 10.0.0.5:8080")
    assert ServerSettings().webhook_hosts() == ["hooks.example.com", "10.0.0.5:8080"]
    assert "webhook_allow" in url_problem("https://example.com/hook", [])
    assert url_problem("https://hooks.example.com:8443/x", ["hooks.example.com:8443"]) is None


def test_a_keys_quota_counts_images_across_ingress_replicas_and_answers_429_with_headers(server):
    url, _ = server
    if time.time() % 60 > 40:  # the quota's minute must not end during the test
        time.sleep(60.5 - time.time() % 60)
    metered = {"X-API-Key": METERED_KEY}
    r = requests.post(url + "/v1/tours", json={"prompt": "a", "num_views": 4, "num_inference_steps": 1},
                      headers=metered, timeout=60)
    assert r.status_code == 200, r.text
    assert (r.headers["x-ratelimit-limit-images"], r.headers["x-ratelimit-remaining-images"]) == ("6", "2")
    assert 0 < int(r.headers["x-ratelimit-reset-images"].removesuffix("s")) <= 60
    broken = server[1].parent / "meshes" / "unreadable.glb"
    broken.write_bytes(b"glTF, not really")  # refused by the model replica, after the quota counted it: given back
    for body, field in (({"num_views": 2, "height": 1024}, "height"), ({"num_views": 7}, "num_views"),
                        ({"num_views": 2, "mesh_uri": str(broken)}, "mesh_uri")):
        bad = requests.post(url + "/v1/tours", json={"prompt": "a", "num_inference_steps": 1, **body},
                            headers=metered, timeout=60)  # refused: nothing counted (7 is more than the quota)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == field, bad.text
        assert bad.headers["x-ratelimit-remaining-images"] == "2"
    answers = [requests.post(url + "/v1/panoramas", json={"prompt": "a", "num_inference_steps": 1}, headers=metered,
                             timeout=60) for _ in range(12)]
    codes = [a.status_code for a in answers]
    assert codes == [200, 200] + [429] * 10, codes  # 4 + 2 = 6 images, whichever replica answered
    assert len({a.headers["X-DiffPano-Replica"] for a in answers}) == 2  # both ingress replicas took part
    refused = answers[-1]
    assert refused.headers["x-ratelimit-remaining-images"] == "0" and 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "quota" in refused.json()["detail"]
    status = requests.get(url + "/v1/stats", headers=metered, timeout=30)  # any /v1 answer carries the headers
    assert status.headers["x-ratelimit-remaining-images"] == "0"
    free = post(url, "/v1/panoramas", {"prompt": "a", "num_inference_steps": 1})  # the default key has no quota
    assert free.status_code == 200 and "x-ratelimit-limit-images" not in free.headers


def test_key_files_and_quota_settings_are_checked_naming_the_setting(tmp_path):
    from pydantic import ValidationError

    from serve.ingress import ServerSettings

    keys = tmp_path / "keys"
    keys.write_text("k-default\nteam-a k-a\n\n")
    assert ServerSettings(api_key_file=str(keys)).api_keys() == {"default": "k-default", "team-a": "k-a"}
    keys.write_text("team a k-a\n")
    with pytest.raises(ValueError, match="api_key_file: line 1"):
        ServerSettings(api_key_file=str(keys)).api_keys()
    keys.write_text("k-one\nk-two\n")  # two keys alone would both be named default
    with pytest.raises(ValueError, match="api_key_file: line 2: the name 'default' is given twice"):
        ServerSettings(api_key_file=str(keys)).api_keys()
    for bad in ({"quotas": {"team a": 5}}, {"quotas": {"team-a": 0}}, {"quota_images_per_minute": 0}):
        with pytest.raises(ValidationError, match="quota"):
            ServerSettings(**bad)


def served_views(url: str, body: dict) -> list[np.ndarray]:
    """The views of a tour generated by the server, decoded."""
    r = post(url, "/v1/tours", body)
    assert r.status_code == 200, r.text
    return [png(base64.b64decode(v["image_png_base64"])) for v in r.json()["views"]]


def test_loras_by_name_switch_per_request_match_generate_lora_and_are_never_batched_together(server, lora_root,
                                                                                             tiny_model_dir,
                                                                                             tmp_path):
    from typer.testing import CliRunner

    from diffpano.cli import build_app

    url, _ = server
    body = {"prompt": "a red bedroom", "num_views": 2, "num_inference_steps": 4, "seed": 3}
    timings, tours = {}, {}
    for name in ("warm", "warm", "cool", None):  # cold, cached, cold again (one LoRA held at a time), none
        started = time.perf_counter()
        tours[name] = served_views(url, body | {"lora": name})
        timings.setdefault(name, []).append(time.perf_counter() - started)
        assert stats(url)["loras"] == ([name] if name else ["cool"])
    assert not np.array_equal(tours["warm"][0], tours["cool"][0]) and not np.array_equal(tours["warm"][0],
                                                                                        tours[None][0])
    for name in ("warm", "cool"):  # the same tour as `diffpano generate --lora ROOT/NAME` (the LoRA fused there)
        out = tmp_path / name
        result = CliRunner().invoke(build_app(), [
            "generate", "a red bedroom", "--model", str(tiny_model_dir), "--lora", str(lora_root / name), "--views",
            "2", "--steps", "4", "--seed", "3", "--out", str(out)])
        assert result.exit_code == 0, result.output
        cli = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(out.rglob("*.png"))][:2]
        assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(cli, tours[name], strict=True)) <= 2
    with ThreadPoolExecutor(6) as pool:  # arriving together: batched, but never one LoRA's tour with another's
        names = ["warm", "cool", None] * 2
        together = list(pool.map(lambda n: served_views(url, body | {"lora": n}), names))
    for name, views in zip(names, together, strict=True):
        assert np.abs(views[0].astype(int) - tours[name][0]).max() <= 2, name
    print(f"LoRA on a replica: cold load {timings['warm'][0]:.2f}s, cached {timings['warm'][1]:.2f}s, "
          f"without {timings[None][0]:.2f}s (a 2-view tour, 4 steps, tiny model)")


@pytest.mark.parametrize(("lora", "message"), [("nope", "no LoRA named 'nope'"), ("../warm", "pattern"),
                                               ("/etc", "pattern")])
def test_a_lora_the_server_does_not_have_gets_422_naming_lora(server, lora, message):
    r = post(server[0], "/v1/tours", {"prompt": "a", "num_views": 2, "lora": lora})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "lora" and message in r.text, r.text
    r = post(server[0], "/v1/jobs", {"specs": [{"tour_id": "t-lora", "prompt": "a", "num_views": 2, "lora": lora}]})
    assert r.status_code == 422 and "lora" in r.text, r.text


def test_loras_and_compile_together_are_refused_naming_lora_root():
    from serve.ingress import ServerSettings

    with pytest.raises(ValueError, match="lora_root: LoRAs are served with compile: off"):
        ServerSettings(lora_root="/loras", compile="default")


def test_quota_reservations_are_admitted_in_order_each_when_it_still_fits():
    """What every replica computes from the same files: a refused reservation counts for nobody."""
    from serve.quotas import admitted

    held = [f"/q/k/1/{i:03d}-x-{n}" for i, n in enumerate((5, 8, 2, 3, 1))]
    chosen, total = admitted(held, 10)
    assert [int(u.rsplit("-", 1)[-1]) for u in held if u in chosen] == [5, 2, 3] and total == 10


def test_tours_on_a_mesh_under_the_servers_roots_or_a_layout_start_from_their_renders(server):
    from diffpano.data.proxy import layout_proxy, mesh_proxy

    url, out = server
    glb = out.parent / "meshes" / "rooms.glb"
    base = {"prompt": "a kitchen with green walls", "num_views": 2, "num_inference_steps": 2, "seed": 5,
            "height": 16, "strength": 0.0}
    for body, proxy in ((base | {"mesh_uri": str(glb)}, mesh_proxy(str(glb), 16, 32, 2, None, 1.0, 5)),
                        (base | {"layout": True}, layout_proxy(5, 16, 32, 2, 1.0, "kitchen", "green"))):
        r = post(url, "/v1/tours", body)
        assert r.status_code == 200, r.text
        views = r.json()["views"]
        assert np.array_equal(np.stack([png(base64.b64decode(v["image_png_base64"])) for v in views]), proxy.rgb)
        assert np.allclose([v["pose_c2w"] for v in views], proxy.poses.reshape(2, 16), atol=1e-5)


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"mesh_uri": "/etc/rooms.glb"}, "mesh_uri", "mesh_roots"),
    ({"mesh_uri": "s3://elsewhere/rooms.glb"}, "mesh_uri", "mesh_roots"),
    ({"mesh_uri": "rooms.glb"}, "mesh_uri", "pattern"),
    ({"layout": True, "strength": 1.5}, "strength", "less than or equal to 1"),
    ({"strength": 0.5}, "body", "strength: only with mesh_uri or layout"),
    ({"layout": True, "mesh_uri": "/x/rooms.glb"}, "body", "give at most one of them"),
])
def test_geometry_the_server_will_not_use_gets_422_naming_the_field(server, body, field, message):
    r = post(server[0], "/v1/tours", {"prompt": "a", "num_views": 2, **body})
    assert r.status_code == 422 and field in json.dumps(r.json()["detail"]) and message in r.text, r.text


def test_a_mesh_that_cannot_be_read_gets_422_naming_mesh_uri(server):
    url, out = server
    broken = out.parent / "meshes" / "broken.glb"
    broken.write_bytes(b"glTF, not really")
    r = post(url, "/v1/tours", {"prompt": "a", "num_views": 2, "num_inference_steps": 1, "mesh_uri": str(broken)})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "mesh_uri" and "unreadable" in r.text, r.text
