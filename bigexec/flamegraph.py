"""A flame graph of stack samples, as one self-contained HTML page (inline SVG and script).

:func:`flamegraph_html` draws the collapsed stacks that :func:`bigexec.stacks.sample_stacks`
counts (``{"outer (a.py:1);inner (b.py:7)": count}``, merged over machines by
:func:`bigexec.profile_formats.merge_collapsed`): one box per frame, the outermost ("all") at
the bottom and each function's callees stacked on it, every box as wide as the time spent in
it and below it. Each box has a ``<title>`` (the browser's tooltip) with its seconds and its
share of the whole; a click zooms into a box, a click on the bottom one zooms out.

The page loads nothing (no script, style sheet or font from elsewhere), so that it works where
it was saved and offline; every name in it is escaped, since a function's name can hold ``<``
or ``&`` (``<lambda>``, ``<listcomp>``).
"""

from __future__ import annotations

import html
import zlib
from dataclasses import dataclass, field

__all__ = ["WIDTH", "flamegraph_html", "flamegraph_svg"]

#: The drawing's width in SVG user units; the page scales it to the window.
WIDTH = 1200.0
_ROW = 17.0  # one frame's height, with a unit of gap
_BOX = 16.0
_TOP = 4.0
_CHAR = 7.2  # the width of a character of the 12-unit monospace font, near enough
_MIN_WIDTH = 0.1  # frames narrower than this are left out (their time is in their parents')


@dataclass
class _Node:
    """A frame of the tree of stacks: its samples, its own and below it, and its callees."""

    count: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def _tree(counts: dict[str, int]) -> tuple[_Node, int]:
    """The stacks as a tree under one root, and the tree's depth (the root's is 0)."""
    root = _Node()
    depth = 0
    for stack, n in counts.items():
        if n <= 0:
            continue
        root.count += n
        node = root
        frames = stack.split(";") if stack else []
        for frame in frames:
            node = node.children.setdefault(frame, _Node())
            node.count += n
        depth = max(depth, len(frames))
    return root, depth


def _color(label: str) -> str:
    # Warm colours, fixed per function (the name without its line), as flamegraph.pl's "hot".
    name = label.rsplit(" (", 1)[0]
    h = zlib.crc32(name.encode())
    return f"rgb({205 + h % 50},{(h >> 8) % 200 + 20},{(h >> 16) % 55})"


def _fit(label: str, width: float) -> str:
    """As much of ``label`` as fits in ``width`` units ("" when not even three characters)."""
    chars = int((width - 6) / _CHAR)
    if chars < 3:
        return ""
    return label if len(label) <= chars else label[: chars - 2] + ".."


def _tooltip(label: str, count: int, total: int, seconds_per_sample: float) -> str:
    share = 100.0 * count / total if total else 0.0
    return f"{label} \u2014 {count * seconds_per_sample:.3f} s, {share:.2f}%"


def flamegraph_svg(counts: dict[str, int], seconds_per_sample: float,
                   root_label: str = "all") -> str:
    """The flame graph of ``counts`` (collapsed stack -> samples) as an ``<svg>`` element.

    ``seconds_per_sample`` turns counts into seconds (``bigexec.stacks.SAMPLE_INTERVAL`` for
    the sampler's). Boxes are ``<g class="f">`` groups of a ``<title>``, a ``<rect>`` and a
    ``<text>``, with ``data-x``/``data-w`` (the box's start and width as fractions of the whole)
    and ``data-d`` (its depth, 0 for the root) for the page's zoom. Raises ValueError for a
    ``seconds_per_sample`` that is not positive.
    """
    if not seconds_per_sample > 0:
        raise ValueError(f"seconds_per_sample must be > 0, not {seconds_per_sample!r}")
    root, depth = _tree(counts)
    total = root.count
    height = _TOP + (depth + 1) * _ROW
    parts = [f'<svg id="flame" xmlns="http://www.w3.org/2000/svg" width="100%" '
             f'viewBox="0 0 {WIDTH:g} {height:g}" data-width="{WIDTH:g}" '
             f'data-seconds="{total * seconds_per_sample:.6f}">']

    def draw(label: str, node: _Node, level: int, start: int) -> None:
        width = WIDTH * node.count / total
        if width < _MIN_WIDTH:
            return
        x = WIDTH * start / total
        y = _TOP + (depth - level) * _ROW
        esc = html.escape(label, quote=True)
        parts.append(
            f'<g class="f" data-x="{start / total:.8f}" data-w="{node.count / total:.8f}" '
            f'data-d="{level}" data-n="{esc}">'
            f"<title>{html.escape(_tooltip(label, node.count, total, seconds_per_sample))}"
            f"</title>"
            f'<rect x="{x:.3f}" y="{y:g}" width="{width:.3f}" height="{_BOX:g}" '
            f'fill="{_color(label)}" rx="2"/>'
            f'<text x="{x + 3:.3f}" y="{y + 12:g}">{html.escape(_fit(label, width))}</text>'
            f"</g>")
        offset = start
        for child_label in sorted(node.children):
            child = node.children[child_label]
            draw(child_label, child, level + 1, offset)
            offset += child.count

    if total:
        draw(root_label, root, 0, 0)
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """
body { font-family: sans-serif; margin: 1em; }
h1 { font-size: 1.2em; }
#flame text { font-family: monospace; font-size: 12px; pointer-events: none; }
#flame g.f { cursor: pointer; }
#flame g.f:hover rect { stroke: #000; stroke-width: 0.6; }
#info { font-family: monospace; min-height: 1.4em; }
"""

# Zoom: a clicked box fills the width, its callees scale with it, its callers span the width
# and every other box hides; the root's box shows everything again. Labels are fitted anew.
_SCRIPT = """
(function () {
  var svg = document.getElementById("flame");
  if (!svg) return;
  var W = parseFloat(svg.getAttribute("data-width"));
  var frames = Array.prototype.slice.call(svg.querySelectorAll("g.f"));
  var info = document.getElementById("info");
  function fit(label, w) {
    var chars = Math.floor((w - 6) / CHAR);
    if (chars < 3) return "";
    return label.length <= chars ? label : label.slice(0, chars - 2) + "..";
  }
  function place(g, x, w) {
    var r = g.querySelector("rect"), t = g.querySelector("text");
    r.setAttribute("x", x.toFixed(3));
    r.setAttribute("width", w.toFixed(3));
    t.setAttribute("x", (x + 3).toFixed(3));
    t.textContent = fit(g.getAttribute("data-n"), w);
  }
  function zoom(target) {
    var x0 = parseFloat(target.getAttribute("data-x"));
    var w0 = parseFloat(target.getAttribute("data-w"));
    var d0 = parseInt(target.getAttribute("data-d"), 10);
    var eps = 1e-9;
    frames.forEach(function (g) {
      var x = parseFloat(g.getAttribute("data-x")), w = parseFloat(g.getAttribute("data-w"));
      var d = parseInt(g.getAttribute("data-d"), 10);
      if (d >= d0 && x >= x0 - eps && x + w <= x0 + w0 + eps) {
        g.style.display = "";
        place(g, (x - x0) / w0 * W, w / w0 * W);
      } else if (d < d0 && x <= x0 + eps && x + w >= x0 + w0 - eps) {
        g.style.display = "";
        place(g, 0, W);
      } else {
        g.style.display = "none";
      }
    });
  }
  frames.forEach(function (g) {
    g.addEventListener("click", function () { zoom(g); });
    g.addEventListener("mouseover", function () {
      info.textContent = g.querySelector("title").textContent;
    });
  });
})();
""".replace("CHAR", f"{_CHAR}")


def flamegraph_html(counts: dict[str, int], seconds_per_sample: float,
                    title: str = "bigexec flame graph", note: str = "") -> str:
    """A whole HTML page drawing ``counts`` (collapsed stack -> samples) as a flame graph.

    ``seconds_per_sample`` turns counts into seconds; ``note`` is a line of text under the
    title (what was profiled, for how long). A profile without samples gets a page that says
    so. Raises ValueError for a ``seconds_per_sample`` that is not positive.
    """
    svg = flamegraph_svg(counts, seconds_per_sample)
    samples = sum(n for n in counts.values() if n > 0)
    if samples:
        summary = (f"{samples * seconds_per_sample:.3f} s of CPU time in {samples} samples "
                   f"of {seconds_per_sample * 1000:g} ms. Hover over a frame for its time; "
                   f"click one to zoom in, the bottom one to zoom out.")
    else:
        summary = "No samples: no thread used the CPU during the window."
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(note)}</p>" if note else "",
        f"<p>{html.escape(summary)}</p>",
        svg,
        '<p id="info"></p>',
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(line for line in lines if line) + "\n"
