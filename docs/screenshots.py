"""Screenshots of the built documentation site in headless Chromium, to look at what a reader sees.

Not run by CI or by the tests. Build the site, then run this script with the folder for the PNGs (default
``/tmp/docs-screenshots``)::

    sphinx-build -W --keep-going -q -b html docs docs/_build/html
    python docs/screenshots.py /tmp/docs-screenshots

It serves ``docs/_build/html`` on a free port of 127.0.0.1 and writes, for the landing page, the quickstart at
its options (whose comments make lines of up to 120 characters) and the API reference, one screenshot in the light
and one in the dark colour scheme, in a window of 1600x1000 (``--width``, ``--height``): ``index-light.png``,
``index-dark.png``, and so on. For each page it also prints how many code blocks scroll sideways at that width, and
exits with 1 if one of them has no line longer than 120 characters (a doctest's long error message may scroll; the
docs' code may not). Other pages: ``--pages demo.html windows.html#burn-in``.

Needs Chromium (Debian: ``apt-get install chromium``; ``--chromium PATH`` for another binary). It is started
headless, without the sandbox (for root), with a new empty profile and its background networking off, so it
reaches nothing but the local server.
"""

import argparse
import functools
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import quote

HTML = Path(__file__).resolve().parent / "_build" / "html"
# the quickstart at its options, whose comments are the lines of 120 characters
PAGES = ("index.html", "quickstart.html#options", "api.html")
SCHEMES = ("light", "dark")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
LONGEST = 120  # the longest lines of the docs' code blocks, which must show whole
WAIT = ("--virtual-time-budget=3000",)  # lets the page's scripts and fonts settle before the shot

# appended to every page served: after loading, the article starts at the element named by `?from=ID` (what comes
# before it is removed: a headless screenshot neither scrolls to an anchor nor draws a page scrolled by a script),
# and the longest line of each code block wider than its box is written into the page, hidden, for `--dump-dom`
CHECK = b"""<script>
window.addEventListener("load", () => {
  const start = new URLSearchParams(location.search).get("from");
  const target = start && document.getElementById(start);
  for (let node = target; node && node.tagName !== "ARTICLE"; node = node.parentElement) {
    while (node.previousElementSibling) node.previousElementSibling.remove();
  }
  const blocks = [...document.querySelectorAll("div.highlight pre")];
  const clipped = blocks.filter(pre => pre.scrollWidth > pre.clientWidth + 1);
  const longest = pre => Math.max(...pre.textContent.split("\\n").map(line => line.length));
  const report = document.createElement("output");
  report.id = "screenshot-check";
  report.hidden = true;
  report.textContent = clipped.map(longest).join(" ") + "/" + blocks.length;
  document.body.append(report);
});
</script>"""


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site, with the script above appended to each page."""

    def log_message(self, format: str, *args: object) -> None:
        """Log nothing: the requests are the script's own."""

    def do_GET(self) -> None:
        """Serve a file; a page with the script appended."""
        path = self.path.partition("?")[0].partition("#")[0]
        if not path.endswith(".html"):
            super().do_GET()
            return
        body = (Path(self.directory) / path.lstrip("/")).read_bytes().replace(b"</body>", CHECK + b"</body>")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def chromium(binary: str, scheme: str, width: int, height: int, *arguments: str) -> str:
    """Run Chromium once with a new empty profile; return what it printed on stdout."""
    with tempfile.TemporaryDirectory(prefix="docs-screenshots-profile-") as profile:
        colour = ["--force-dark-mode", "--blink-settings=preferredColorScheme=0"] if scheme == "dark" else []
        colour = colour or ["--blink-settings=preferredColorScheme=1"]
        command = [binary, *FLAGS, *colour, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        result = subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=120, check=True)
        return result.stdout


def main(argv: list[str] | None = None) -> int:
    """Take the screenshots; return 1 if a code block of lines of at most 120 characters scrolls sideways."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="/tmp/docs-screenshots", type=Path, help="folder for the PNGs")
    parser.add_argument("--html", type=Path, default=HTML, help="the built site (default: docs/_build/html)")
    parser.add_argument("--chromium", default=None, help="the Chromium binary (default: chromium on the PATH)")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument(
        "--pages", nargs="+", default=list(PAGES), help="pages of the site, e.g. quickstart.html#options"
    )
    args = parser.parse_args(argv)
    binary = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        parser.error("no Chromium found: apt-get install chromium, or give --chromium PATH")
    if not (args.html / "index.html").is_file():
        parser.error(f"{args.html} has no index.html: build the site first (sphinx-build ... docs docs/_build/html)")
    args.out.mkdir(parents=True, exist_ok=True)

    handler = functools.partial(Handler, directory=str(args.html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_address[1]}"
    failed = False
    try:
        for page in args.pages:
            path, _, anchor = page.partition("#")
            dom = chromium(binary, "light", args.width, args.height, *WAIT, "--dump-dom", f"{root}/{path}")
            found = re.search(r'<output id="screenshot-check" hidden="">(.*?)/(\d+)</output>', dom)
            if found is None:
                print(f"{path}: the check did not run", file=sys.stderr)
                failed = True
                continue
            widths = [int(width) for width in found.group(1).split()]
            short = [width for width in widths if width <= LONGEST]
            failed = failed or bool(short)
            print(
                f"{path}: {found.group(2)} code blocks; clipped at {args.width} px with lines of at most {LONGEST} "
                f"characters: {len(short)}{f' (longest lines {short})' if short else ''}; with longer lines (they "
                f"scroll): {len(widths) - len(short)}"
            )
            for scheme in SCHEMES:
                png = args.out / f"{Path(path).stem}-{scheme}.png"
                start = f"?from={quote(anchor)}" if anchor else ""  # not `#anchor`: Furo highlights the target
                chromium(binary, scheme, args.width, args.height, *WAIT, f"--screenshot={png}", f"{root}/{path}{start}")
                print(f"  {png}")
    finally:
        server.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
