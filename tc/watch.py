"""Watching an episode: its frames with the thought and action of each step, as GIF or HTML.

The frames come from ``env.render()`` (render_mode="rgb_array"); the GIF is written with
Pillow (already a dependency of matplotlib), the HTML page is self-contained (frames as
embedded PNGs, a slider and a play button).
"""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from tc.envs import ACTION_NAMES
from tc.evaluate import Rollout, evaluate
from tc.io import atomic_path

FORMATS = (".gif", ".html")
LINE, CAPTION_LINES = 12, 3  # text line height (px) and caption lines under each GIF frame


def captions(ep: Rollout) -> list[str]:
    """One caption per frame: the step's thought and action, then how the episode ended."""
    out = []
    for i in range(len(ep.frames)):
        if i < len(ep.actions):
            thought = ep.thoughts[i] if i < len(ep.thoughts) else ""
            out.append(f"step {i}: {ACTION_NAMES[ep.actions[i]]}" + (f" -- thinks: {thought}" if thought else ""))
        elif ep.halted:
            out.append(f"step {i}: halted by the intervention before acting")
        else:
            restarts = f" (the oracle bot re-planned {ep.bot_restarts}x)" if ep.bot_restarts else ""
            out.append(f"end after {ep.length} steps: {'success' if ep.success else 'failure'}{restarts}")
    return out


def _scaled(frame, scale: float) -> Image.Image:
    img = Image.fromarray(frame)
    if scale != 1:
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.NEAREST)
    return img


def _annotated(frame, mission: str, caption: str, scale: float) -> Image.Image:
    """The frame with the mission above it and the caption below it (Pillow's default font, wrapped)."""
    img = _scaled(frame, scale)
    chars = max(20, img.width // 6)  # the default bitmap font is ~6 px per character
    top = textwrap.wrap(mission, chars)
    bottom = textwrap.wrap(caption, chars)[:CAPTION_LINES]
    canvas = Image.new("RGB", (img.width, img.height + LINE * (len(top) + CAPTION_LINES) + 8), "white")
    canvas.paste(img, (0, LINE * len(top) + 4))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(top):
        draw.text((4, 2 + LINE * k), line, fill="black")
    for k, line in enumerate(bottom):
        draw.text((4, img.height + LINE * (len(top) + k) + 6), line, fill="black")
    return canvas


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_gif(ep: Rollout, path: str | Path, fps: float = 4, scale: float = 0.5) -> None:
    frames = [_annotated(f, ep.mission, c, scale) for f, c in zip(ep.frames, captions(ep))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    _write_atomic(Path(path), buf.getvalue())


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:1em}} #cap{{font-family:monospace;min-height:2.5em}}</style></head>
<body><h3>{title}</h3><p>mission: <b>{mission}</b></p>
<img id="frame" alt="frame"><p id="cap"></p>
<button id="play">play</button> <input id="pos" type="range" min="0" value="0" style="width:60%">
<script>
const frames = {frames};
const caps = {caps};
const img = document.getElementById("frame"), cap = document.getElementById("cap"), pos = document.getElementById("pos");
pos.max = frames.length - 1;
function show(i) {{ img.src = "data:image/png;base64," + frames[i]; cap.textContent = caps[i]; pos.value = i; }}
let timer = null;
document.getElementById("play").onclick = () => {{
  if (timer) {{ clearInterval(timer); timer = null; return; }}
  timer = setInterval(() => {{ const i = (+pos.value + 1) % frames.length; show(i); }}, 1000 / {fps});
}};
pos.oninput = () => show(+pos.value);
show(0);
</script></body></html>
"""


def write_html(ep: Rollout, path: str | Path, fps: float = 4, scale: float = 0.5, title: str = "episode") -> None:
    pngs = []
    for frame in ep.frames:
        buf = io.BytesIO()
        _scaled(frame, scale).save(buf, format="PNG", optimize=True)
        pngs.append(base64.b64encode(buf.getvalue()).decode())
    page = _PAGE.format(
        title=html.escape(title), mission=html.escape(ep.mission), frames=json.dumps(pngs),
        caps=json.dumps(captions(ep)), fps=fps,
    )  # fmt: skip
    _write_atomic(Path(path), page.encode())


def save_episode(ep: Rollout, path: str | Path, fps: float = 4, scale: float = 0.5, title: str = "episode") -> None:
    """Write ``ep`` (recorded with render=True) as .gif or .html, by the suffix of ``path``."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unknown format {suffix!r}; expected one of {FORMATS}")
    if not ep.frames:
        raise ValueError("the episode has no frames: record it with render=True")
    if suffix == ".gif":
        write_gif(ep, path, fps, scale)
    else:
        write_html(ep, path, fps, scale, title)


def watch(
    agent, env_id: str, seed: int, mode: str = "tc", *, argmax: bool = True, max_steps: int | None = None
) -> Rollout:
    """Record one episode with frames (see :func:`tc.evaluate.evaluate` for the modes)."""
    (ep,) = evaluate(
        agent, env_id, [seed], mode, batch_size=1, argmax=argmax, render=True, max_steps=max_steps, progress=False
    )
    return ep
