"""The HTML pages at a laptop's width, in a real browser: headless Chromium lays out a dataset page with every
section (summary, comparisons, accuracy against cost, classes with 100 classes, runs with their evaluation and
most confident mistakes) at 1280 px, every <details> opened; the page itself must not scroll sideways (wide
tables scroll in their own box, figures scale to the column)."""
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from test_classes import write_eval
from test_report import EVIL_TAG, make_run

import plot

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (apt-get install chromium)")
WIDTH = 1280
# Reports the layout's widths through the title, which --dump-dom prints.
PROBE = ("<script>document.title = document.documentElement.scrollWidth + ' ' + "
         "document.documentElement.clientWidth;</script>")


def laid_out_width(page) -> tuple[int, int]:
    """(scroll width, client width) of a page in Chromium at WIDTH px, read from a copy beside it with its
    content policy taken out (so that the probe script runs), every <details> open and every image loaded."""
    html = page.read_text()
    html = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html)
    html = html.replace("<details>", "<details open>").replace(' loading="lazy"', "")
    probe = page.with_name("probe.html")
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={WIDTH},900",
                             "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                            capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(\d+) (\d+)</title>", result.stdout)
    assert title, f"Chromium printed no probe title: {result.stderr[-2000:]}"
    return int(title.group(1)), int(title.group(2))


def test_a_full_dataset_page_does_not_scroll_sideways_at_1280_px(tmp_path):
    dataset_dir = tmp_path / "results" / "cifar100"
    rng = np.random.default_rng(0)
    names = [f"a_rather_long_class_name_{k}" for k in range(100)]
    superclasses = {name: f"superclass_{k // 5}" for k, name in enumerate(names)}
    mistakes = [{"index": k, "true": names[k], "predicted": names[k + 1], "confidence": 0.99 - k / 100}
                for k in range(16)]
    models = ("cnn_base", "cnn_resnet18", "cnn_vgg11", "cnn_se_resnet18")
    for model in models:
        for seed in (1, 2, 3):
            run_dir = make_run(dataset_dir, model, f"seed{seed}", seed=seed)
            config = json.loads((run_dir / "config.json").read_text())
            config.update(train_images=50000, parameters=int(rng.integers(10**5, 10**8)))
            (run_dir / "config.json").write_text(json.dumps(config))
            metrics = (run_dir / "metrics.csv").read_text().splitlines()
            (run_dir / "metrics.csv").write_text("\n".join([metrics[0] + ",train_seconds"]
                                                           + [line + f",{2 + seed}" for line in metrics[1:]]) + "\n")
            confusion = rng.integers(0, 3, size=(100, 100)) + np.eye(100, dtype=int) * 5
            write_eval(run_dir, names, confusion, superclasses=superclasses, mistakes=mistakes)
    make_run(dataset_dir, "cnn_resnet34", "wip" + EVIL_TAG[:0], epochs=1, finished=False)
    assert plot.main([str(dataset_dir.parent)]) == 0
    page = dataset_dir / "index.html"
    for section in ("<h2>Comparisons</h2>", "<h2>Accuracy against cost</h2>", "<h2>Classes</h2>",
                    "Most confident mistakes (16)"):
        assert section in page.read_text()
    scroll_width, client_width = laid_out_width(page)
    assert client_width <= WIDTH and scroll_width <= client_width, \
        f"the page is {scroll_width} px wide in a {client_width} px window"


def test_the_probe_sees_a_page_that_does_scroll_sideways(tmp_path):
    """The check above can fail: a page with a table too wide for the window, outside a scroll box, is caught."""
    page = tmp_path / "index.html"
    page.write_text("<!DOCTYPE html><html><head><title>t</title></head><body><table><tr>"
                    + "<td>a_cell_that_does_not_wrap</td>" * 80 + "</tr></table></body></html>")
    scroll_width, client_width = laid_out_width(page)
    assert scroll_width > client_width
