"""Screenshots of the try-on page with an outfit tried on: docs/images/page.png (desktop) and
docs/images/page_phone.png (390 px wide, the whole page).

    python bench/page_screenshot.py                           # starts Ray Serve here (~1 min on 2 CPUs)
    python bench/page_screenshot.py --url http://127.0.0.1:8000 --key "$TRYON_API_KEY"   # a running server

Not a benchmark: the page in Debian's chromium (/usr/bin/chromium) through Playwright, as
tests/test_serve_api.py drives it. Without ``--url`` the Serve application is the one of
``serve/config.yaml`` (its first existing LoRA, else ``--lora``, else the tiny base with its shipped
alpha, ``configs/tiny.yaml``), no parser, on 127.0.0.1 and a free port. The page is filled from the
server's gallery (``GET /v1/examples``): a person, a top and a bottom, the person's own masks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_overhead import start_serve  # noqa: E402  (after the path: run as a script)


def serve_settings(lora: str) -> dict:
    """``serve/config.yaml``'s args, with ``lora`` (a folder) first; the base alone if no LoRA exists."""
    args = yaml.safe_load((ROOT / "serve/config.yaml").read_text())["applications"][0]["args"]
    loras = ([lora] if lora else []) + list(args.get("lora") or [])
    args["lora"] = [f for f in loras if (ROOT / f).is_dir() or Path(f).is_dir()][:1]
    return {**args, "torch_threads": 1}


def shoot(url: str, key: str, out: Path, person: int, upper: int, lower: int, steps: int | None,
          seed: int) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url.rstrip("/") + "/")
            if key:
                page.fill("#apikey", key)
            page.wait_for_function("document.getElementById('model').textContent.startsWith('model:')")
            page.wait_for_selector("#persons button")
            page.locator("#persons button").nth(person).click()
            page.wait_for_function("state.painted.upper && state.painted.lower")
            page.locator("#garments button.upper").nth(upper).click()
            page.locator("#garments button.lower").nth(lower).click()
            page.click("text=Options")
            if steps:
                page.fill("#steps", str(steps))
            page.fill("#seed", str(seed))
            page.click("#submit")
            page.wait_for_selector("#progress", state="visible")
            page.wait_for_function("document.getElementById('result').naturalWidth > 0", timeout=300_000)
            page.wait_for_selector("#progress", state="hidden")
            page.click("text=Options")  # folded again: the picture is about the outfit
            page.set_viewport_size({"width": 1280, "height": 800})
            out.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out / "page.png"), full_page=True)
            page.set_viewport_size({"width": 390, "height": 844})
            page.screenshot(path=str(out / "page_phone.png"), full_page=True)
            print(page.inner_text("#meta"))
        finally:
            browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="", help="a running server (default: start one here)")
    ap.add_argument("--key", default=os.environ.get("TRYON_API_KEY", ""), help="its API key, if it has one")
    ap.add_argument("--lora", default="", help="LoRA folder for the server started here")
    ap.add_argument("--out", default=str(ROOT / "docs/images"))
    ap.add_argument("--person", type=int, default=1, help="which example person (0-based)")
    ap.add_argument("--upper", type=int, default=0, help="which example top")
    ap.add_argument("--lower", type=int, default=2, help="which example bottom")
    ap.add_argument("--steps", type=int, default=None, help="default: the model config's")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.url:
        shoot(args.url, args.key, Path(args.out), args.person, args.upper, args.lower, args.steps, args.seed)
        return
    import ray
    from ray import serve

    from serve.app import application

    url = start_serve()
    try:
        settings = serve_settings(args.lora)
        print("serving", settings["lora"] or "the base alone", flush=True)
        serve.run(application(settings, model_options={"ray_actor_options": {"num_cpus": 0}}), name="tryon",
                  route_prefix="/")
        requests.get(f"{url}/v1/examples", timeout=120).raise_for_status()
        shoot(url, "", Path(args.out), args.person, args.upper, args.lower, args.steps, args.seed)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"wrote {args.out}/page.png and {args.out}/page_phone.png")


if __name__ == "__main__":
    main()
