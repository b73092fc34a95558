"""Open a Pd patch in Pd's own GUI on a virtual 1366 x 768 screen (Xvfb) and report what Pd drew.

A layout is only known once Tk has drawn it (text widths come from the font), so a
GUI plugin, loaded from a folder on Pd's search path, writes every canvas item's box
after Pd has drawn the patch and says so on stdout; then the screen is grabbed.
`python -m tests.pdgui OUT.png [PATCH]` writes the patch window's screenshot (the README's
picture: `make pd-screenshot`). Needs Xvfb (apt xvfb), Pd's GUI (apt puredata-gui) and
Pillow built with XCB (matplotlib's dependency).
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SCREEN = (1366, 768)  # the laptop screen the patch is laid out for
DRAW_TIMEOUT = 30.0  # Pd's GUI starts and draws in ~2 s; this only stops a hung one
REPO = Path(__file__).resolve().parents[1]
PD_PATCH = REPO / "patches" / "pd" / "antiphon.pd"

# After Pd's last call when it draws a canvas (its scroll region), once Tk is idle: every
# item's type, box and tags (and a text item's text) to $PD_GEOMETRY_OUT, then a stdout line.
PLUGIN = r"""
proc ::pdgeometry_dump {c} {
    if {![winfo exists $c]} return
    update idletasks
    set top [winfo toplevel $c]
    set path $::env(PD_GEOMETRY_OUT)
    set f [open $path.tmp w]
    puts $f "canvas\t[winfo rootx $c] [winfo rooty $c] [winfo width $c] [winfo height $c]\t$::xscrollable($c) $::yscrollable($c)"
    foreach item [$c find all] {
        set text ""
        if {[$c type $item] eq "text"} {set text [string map {"\n" "\\n" "\t" " "} [$c itemcget $item -text]]}
        puts $f "item\t[$c type $item]\t[$c bbox $item]\t[$c gettags $item]\t$text"
    }
    close $f
    file rename -force $path.tmp $path
    puts stdout "PDGEOMETRY [wm title $top]"
    flush stdout
}
proc ::pdgeometry_drawn {cmd code result op} {
    after idle [list ::pdgeometry_dump [lindex $cmd 1]]
}
trace add execution ::pdtk_canvas::pdtk_canvas_getscroll leave ::pdgeometry_drawn
"""


@dataclass(frozen=True)
class Item:
    """One Tk canvas item: its type, box (x1, y1, x2, y2 in canvas pixels), tags and text."""

    kind: str
    box: tuple[int, int, int, int]
    tags: tuple[str, ...]
    text: str


@dataclass
class Drawn:
    """A patch window as Pd drew it: the canvas's place on screen (x, y, width, height),
    whether Tk showed scrollbars (content beyond the window), its items and the screen."""

    canvas: tuple[int, int, int, int]
    scrollbars: tuple[bool, bool]
    items: list[Item]
    screen: object  # PIL.Image.Image of the whole virtual screen

    def window_image(self):
        """The patch window: its menu bar (above the canvas, from the screen's top) and canvas."""
        x, y, w, h = self.canvas
        return self.screen.crop((x, 0, x + w, y + h))


def parse_geometry(text: str) -> tuple[tuple[int, int, int, int], tuple[bool, bool], list[Item]]:
    canvas, scroll, items = (0, 0, 0, 0), (False, False), []
    for line in text.splitlines():
        fields = line.split("\t")
        if fields[0] == "canvas":
            canvas = tuple(int(v) for v in fields[1].split())
            scroll = tuple(v == "1" for v in fields[2].split())
        elif fields[0] == "item" and fields[2]:  # an item with no box (empty text) takes no room
            items.append(Item(fields[1], tuple(int(float(v)) for v in fields[2].split()),
                              tuple(fields[3].split()), fields[4].replace("\\n", "\n")))
    return canvas, scroll, items


@contextmanager
def virtual_screen(size: tuple[int, int] = SCREEN) -> Iterator[str]:
    """An Xvfb screen of `size` on a display number it picks itself; yields ':N'."""
    read, write = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", f"{size[0]}x{size[1]}x24", "-nolisten", "tcp"],
        pass_fds=(write,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        got: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=lambda: got.put(os.read(read, 64)), daemon=True).start()
        try:
            number = got.get(timeout=DRAW_TIMEOUT).strip()
        except queue.Empty:
            number = b""
        if not number:
            raise RuntimeError(f"Xvfb did not start (exit {proc.poll()})")
        yield f":{number.decode()}"
    finally:
        os.close(read)
        proc.terminate()
        proc.wait(15)


def not_blank(image) -> bool:
    """More than one colour, and no single colour over 97 % of the pixels."""
    colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    if colours is None:  # more than 65536 colours: not blank
        return True
    return len(colours) > 1 and max(n for n, _ in colours) < 0.97 * image.width * image.height


def draw(patch: Path, display: str, workdir: Path) -> Drawn:
    """Open `patch` in Pd's GUI on `display`; what it drew, once drawn and on screen."""
    from PIL import ImageGrab

    plugins = workdir / "pdgeometry"
    plugins.mkdir(exist_ok=True)
    (plugins / "pdgeometry-plugin.tcl").write_text(PLUGIN)
    out = workdir / "geometry.tsv"
    env = dict(os.environ, DISPLAY=display, PD_GEOMETRY_OUT=str(out))
    proc = subprocess.Popen(["pd", "-nosound", "-nomidi", "-stderr", "-path", str(plugins), "-open", str(patch)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        while True:
            try:
                line = lines.get(timeout=DRAW_TIMEOUT)
            except queue.Empty:
                line = ""
            seen.append(line)
            if not line:
                raise RuntimeError(f"Pd's GUI did not draw {patch.name}:\n{''.join(seen)}")
            if line.startswith(f"PDGEOMETRY {patch.name}"):
                break
        canvas, scrollbars, items = parse_geometry(out.read_text())
        x, y, w, h = canvas
        # Tk has drawn by now; the grab may still race its last flush, so look again until drawn
        for _ in range(20):
            screen = ImageGrab.grab(xdisplay=display)
            if not_blank(screen.crop((x, y, x + w, y + h))):
                break
            try:
                lines.get(timeout=0.25)  # a deadline'd pause that also drains Pd's output
            except queue.Empty:
                pass
        return Drawn(canvas, scrollbars, items, screen)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main(argv: list[str]) -> int:
    """Write the screenshot of a patch (antiphon.pd unless given) as Pd draws it at 1366 x 768."""
    if not argv or len(argv) > 2:
        print("usage: python -m tests.pdgui OUT.png [PATCH.pd]", file=sys.stderr)
        return 2
    patch = Path(argv[1]) if len(argv) > 1 else PD_PATCH
    with tempfile.TemporaryDirectory() as tmp, virtual_screen() as display:
        drawn = draw(patch.resolve(), display, Path(tmp))
    drawn.window_image().save(argv[0], optimize=True)
    print(f"wrote {argv[0]}: {patch.name} as Pd draws it on a {SCREEN[0]} x {SCREEN[1]} screen")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
