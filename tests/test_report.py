"""Post-processing at the end of `numba-recon run --mask`, the mask checks, and the HTML report:
its content without a browser, its regeneration by `numba-recon report`, and a headless Chromium
rendering that checks every image of the page loads (skipped, saying why, where no Chromium can be
found: on PATH, in the usual install folders, in a Playwright cache or in $NUMBA_RECON_CHROMIUM).

About 15 s on 2 cores: one simulated set (box 24, 600 particles) and one D7 run of 3 epochs.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numba_recon.cli import main
from numba_recon.errors import InputFileError
from numba_recon.io.mrc import read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "benchmarks" / "report_screenshot.py"
BOX = 24
ANGPIX = 4.0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """600 D7 particles (box 24, 4 A/px, SNR 0.05) and a soft mask made from the truth."""
    from numba_recon.evaluate.mask import auto_threshold, create_mask
    from numba_recon.sim.simulate import simulate_dataset

    d = tmp_path_factory.mktemp("report")
    simulate_dataset(d / "data", n_particles=600, box_size=BOX, pixel_size_angstrom=ANGPIX, snr=0.05, seed=1,
                     max_shift_px=2.0, particles_per_stack=300)
    truth, _ = read_volume(d / "data" / "truth.mrc")
    mask = create_mask(truth, auto_threshold(truth), extend_px=2, soft_edge_px=4, lowpass_angstrom=15,
                       pixel_size_angstrom=ANGPIX)
    write_volume(d / "mask.mrc", mask, ANGPIX)
    write_volume(d / "mask_box20.mrc", mask[2:22, 2:22, 2:22], ANGPIX)
    write_volume(d / "mask_angpix.mrc", mask, 3.0)
    write_volume(d / "mask_values.mrc", 2.0 * mask, ANGPIX)
    write_volume(d / "mask_empty.mrc", np.zeros_like(mask), ANGPIX)
    return d


@pytest.fixture(scope="module")
def run_dir(data) -> Path:
    from click.testing import CliRunner

    out = data / "run"
    res = CliRunner().invoke(main, ["-q", "run", str(data / "data" / "particles.star"), "-o", str(out), "--epochs", "3",
                                    "--batch-size", "100", "--backend", "cpu", "--sym", "D7", "--loss", "trimmed",
                                    "--mask", str(data / "mask.mrc")])
    assert res.exit_code == 0, res.output
    return out


# ---------------------------------------------------------------------------------------------
# Post-processing inside the run
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_with_mask_postprocesses_like_the_postprocess_command(run_dir, data, runner):
    import starfile

    from numba_recon.evaluate.postprocess import POSTPROCESS_FILES

    for name in POSTPROCESS_FILES:
        assert (run_dir / "postprocess" / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    pp = summary["postprocess"]
    general = starfile.read(run_dir / "postprocess" / "postprocess.star", always_dict=True)["general"]
    assert pp["resolution_angstrom"] == pytest.approx(float(general["rlnFinalResolution"]), abs=1e-4)
    assert pp["bfactor"] == pytest.approx(float(general["rlnBfactorUsedForSharpening"]), abs=1e-3)
    assert 2 * ANGPIX <= pp["resolution_angstrom"] < BOX * ANGPIX
    assert pp["mask"].endswith("mask.mrc") and pp["mask_used"]
    # the stand-alone command on the run's half maps with the same mask gives the same figures
    res = runner.invoke(main, ["postprocess", str(run_dir / "run_half1_class001_unfil.mrc"),
                               str(run_dir / "run_half2_class001_unfil.mrc"), "--mask", str(data / "mask.mrc"),
                               "-o", str(data / "post_cli")])
    assert res.exit_code == 0, res.output
    cli = starfile.read(data / "post_cli" / "postprocess.star", always_dict=True)["general"]
    assert float(cli["rlnFinalResolution"]) == pytest.approx(pp["resolution_angstrom"], abs=1e-4)
    assert float(cli["rlnBfactorUsedForSharpening"]) == pytest.approx(pp["bfactor"], abs=1e-3)
    # the run's sharpened map is the command's one, averaged over the point group (the default
    # solver's final symmetrisation, docs/symmetry.md)
    from numba_recon.symmetry.groups import symmetrize_volume, symmetry_operators

    ours, _ = read_volume(run_dir / "postprocess" / "postprocess.mrc")
    theirs, _ = read_volume(data / "post_cli" / "postprocess.mrc")
    np.testing.assert_allclose(ours, symmetrize_volume(theirs, symmetry_operators("D7")),
                               atol=1e-5 * np.abs(theirs).max())


@pytest.mark.parametrize("name,fragment", [
    ("mask_box20.mrc", "mask box 20 differs from the particle box 24"),
    ("mask_angpix.mrc", "voxel size"),
    ("mask_values.mrc", "outside [0, 1]"),
    ("mask_empty.mrc", "empty"),
    ("missing.mrc", "not found"),
])
def test_validate_mask(data, name, fragment):
    with pytest.raises(InputFileError) as info:
        from numba_recon.evaluate.mask import validate_mask

        validate_mask(data / name, BOX, ANGPIX)
    text = str(info.value)
    assert text.startswith(str(data / name)) and fragment in text and "\n" not in text


def test_validate_mask_accepts_a_good_mask(data):
    from numba_recon.evaluate.mask import validate_mask

    mask = validate_mask(data / "mask.mrc", BOX, ANGPIX)
    assert mask.shape == (BOX,) * 3 and mask.dtype == np.float32 and 0 <= mask.min() and mask.max() <= 1


def test_run_refuses_a_wrong_mask_before_reconstructing(data, tmp_path, runner, assert_one_line_error):
    out = tmp_path / "run"
    res = runner.invoke(main, ["-q", "run", str(data / "data" / "particles.star"), "-o", str(out), "--epochs", "2",
                               "--backend", "cpu", "--mask", str(data / "mask_box20.mrc")])
    assert_one_line_error(res, "mask_box20.mrc", "differs from the particle box")
    # refused at the start: no epoch ran, no map was written
    assert not (out / "history.csv").exists()
    assert not list(out.glob("*.mrc")) and not (out / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# The HTML page
# ---------------------------------------------------------------------------------------------

SECTIONS = ("summary", "fsc", "postprocess", "history", "slices", "projections", "directions", "scores", "symmetry",
            "command", "versions")
#: The figures of a run with --mask and a robust loss, as embedded in its page.
FIGURES = ("plots/fsc.png", "plots/loss.png", "plots/slices.png", "plots/projections.png", "plots/directions.png",
           "plots/scores.png", "postprocess/postprocess_fsc.png", "postprocess/postprocess_guinier.png")


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.mark.slow
def test_report_has_every_section_and_embeds_its_images(run_dir):
    page = (run_dir / "report.html").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    for anchor in SECTIONS:
        assert f'id="{anchor}"' in page, anchor
    # every figure is embedded, and they are the run's own plots
    pngs = _embedded_pngs(page)
    assert page.count("<img") == len(pngs) == len(FIGURES)
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    for name in FIGURES:
        assert (run_dir / name).read_bytes() in pngs, name
    # self-contained: nothing is fetched from anywhere
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    for attr in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert attr.startswith(("data:image/png;base64,", "#")), attr
    # the figures a reader looks for first
    assert f"{summary['resolution_angstrom']:.2f} \u00c5" in page
    assert f"{summary['postprocess']['resolution_angstrom']:.2f} \u00c5" in page
    assert "D7" in page and "14 operators" in page
    assert "numba-recon" in page and summary["environment"]["numba"] in page and summary["environment"]["numpy"] in page
    assert f"<pre>{html.escape(summary['command_line'])}</pre>" in page  # the command line, as run


@pytest.mark.slow
def test_report_command_redraws_the_plots(run_dir, runner, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "plots")
    (copy / "report.html").unlink()
    res = runner.invoke(main, ["report", str(copy)])
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output
    for name in ("fsc.png", "loss.png", "slices.png", "projections.png", "directions.png", "scores.png"):
        assert (copy / "plots" / name).is_file(), name
    page = (copy / "report.html").read_text()
    assert all(f'id="{a}"' in page for a in SECTIONS)
    assert len(_embedded_pngs(page)) == len(FIGURES)


def test_report_command_bad_inputs(runner, tmp_path, assert_one_line_error):
    assert_one_line_error(runner.invoke(main, ["report", str(tmp_path / "nope")]), "no such run folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(runner.invoke(main, ["report", str(tmp_path / "empty")]), "no summary.json")


def test_plain_run_report_has_no_optional_sections(tmp_path):
    # a C1, L2, unmasked run: no post-processing, score or symmetry section, and nothing missing
    from numba_recon.report.page import write_html_report

    (tmp_path / "summary.json").write_text(json.dumps({
        "resolution_angstrom": 7.5, "resolution_fsc05_angstrom": 9.0, "particles": 10, "box_size": 24,
        "pixel_size_angstrom": 4.0, "config": {"loss": "l2", "symmetry": "C1"}, "command_line": "numba-recon run x",
        "environment": {"numba": "0.0"}}))
    page = write_html_report(tmp_path).read_text()
    for anchor in ("postprocess", "scores", "symmetry"):
        assert f'id="{anchor}"' not in page
    assert "7.50 \u00c5" in page and "<img" not in page


# ---------------------------------------------------------------------------------------------
# Rendering in a browser
# ---------------------------------------------------------------------------------------------

#: Browser names on PATH (Debian's chromium, Ubuntu's, Google's, Playwright's headless shell).
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome",
                  "chrome-headless-shell", "headless_shell")
#: Where browsers live when they are not on PATH.
CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/lib/chromium-browser/chromium-browser", "/snap/bin/chromium",
                  "/opt/google/chrome/chrome", "/opt/google/chrome/google-chrome", "/usr/local/bin/chromium")
#: Playwright's downloads: full Chromium and the headless shell, older and newer folder layouts.
PLAYWRIGHT_GLOBS = ("chromium-*/chrome-linux*/chrome", "chromium_headless_shell-*/chrome-linux*/headless_shell",
                    "chromium_headless_shell-*/chrome-headless-shell-linux*/chrome-headless-shell")


def find_chromium() -> tuple[str | None, str]:
    """A Chromium (or Chrome) executable, and where it was looked for (for the skip message).

    Order: ``$NUMBA_RECON_CHROMIUM`` (``.ci/run`` sets it when it finds a browser off PATH), PATH,
    the usual install folders, then Playwright's cache (``$PLAYWRIGHT_BROWSERS_PATH`` or
    ``~/.cache/ms-playwright``).
    """
    import glob
    import os

    def runnable(path: str | None) -> bool:
        return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)

    explicit = os.environ.get("NUMBA_RECON_CHROMIUM")
    if runnable(explicit):
        return explicit, ""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path, ""
    for path in CHROMIUM_PATHS:
        if runnable(path):
            return path, ""
    cache = os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or os.path.expanduser("~/.cache/ms-playwright")
    for pattern in PLAYWRIGHT_GLOBS:
        for path in sorted(glob.glob(os.path.join(cache, pattern)), reverse=True):
            if runnable(path):
                return path, ""
    looked = (f"$NUMBA_RECON_CHROMIUM{' (' + explicit + ', not executable)' if explicit else ' (unset)'}, "
              f"PATH ({', '.join(CHROMIUM_NAMES)}), {', '.join(CHROMIUM_PATHS)} and the Playwright cache {cache}")
    return None, looked


CHROMIUM, _LOOKED = find_chromium()
NO_CHROMIUM = (f"no Chromium or Chrome executable found (looked in {_LOOKED}); install one with "
               "`apt-get install chromium` (.ci/run does so when it runs as root with apt-get and a network)")

#: Appended to a copy of the page: once everything has loaded, write each <img>'s state into the
#: DOM, where --dump-dom shows it. naturalWidth is 0 for an image the browser could not decode.
_IMAGE_CHECK = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var result = {
    count: images.length,
    widths: images.map(function (im) { return im.naturalWidth; }),
    failed: images.filter(function (im) { return !(im.complete && im.naturalWidth > 0); })
                  .map(function (im) { return im.alt; })
  };
  var out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def _dump_dom(browser: str, page: Path, profile: Path) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_every_image_of_the_report_loads_in_headless_chromium(run_dir, tmp_path):
    page = (run_dir / "report.html").read_text()
    n_images = page.count("<img")
    assert n_images == len(FIGURES)
    # a control image that cannot be decoded shows that the check sees a failed image
    control = '<img alt="broken control" src="data:image/png;base64,AAAA">'
    probe = tmp_path / "report_probe.html"
    probe.write_text(page.replace("</body>", control + _IMAGE_CHECK + "\n</body>"))
    dom = _dump_dom(CHROMIUM, probe, tmp_path / "profile")
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom, re.S)
    assert found, "the check script did not run: " + dom[-1000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result["count"] == n_images + 1
    assert result["failed"] == ["broken control"], result
    # each of the report's images decoded at the width of its PNG (110 dpi figures: hundreds of pixels)
    assert all(w > 300 for w in result["widths"][:n_images]), result["widths"]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    from PIL import Image

    png = tmp_path / "report.png"
    proc = subprocess.run([sys.executable, str(SCREENSHOT), str(run_dir / "report.html"), str(png),
                           "--chromium", CHROMIUM], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    image = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert image.shape == (3000, 1200)
    # a page with text and figures, not a blank or error page: dark text near the top, and the
    # figures (wide grey-level range) further down
    top = image[:200]
    assert (top < 80).mean() > 0.002
    assert image.std() > 20
    assert len(np.unique(image[300:].astype(np.uint8))) > 100
