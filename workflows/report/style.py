"""How the report page looks: its CSS and the colour of each state. Pure constants."""

from __future__ import annotations

import hashlib

STATE_COLOURS = {
    "Preflight": "#9db4d0",
    "Draining": "#f0b050",
    "Patching": "#d8b23a",
    "Enabling": "#8e6cc4",
    "Rebalancing": "#4aa3a2",
    "Done": "#3c9a4d",
    "Failed": "#b0202a",
    "Aborted": "#777777",
    "Refused": "#555555",
    "Abandoned": "#333333",
}
PALETTE = ("#6a8caf", "#c49a6c", "#7fa36b", "#b57fb3", "#c7a83a", "#5fa0c6", "#a36b6b")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 color:#1d2330;margin:24px auto;max-width:1200px;padding:0 16px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde}
h3{font-size:15px;margin:18px 0 6px}h4{font-size:14px;margin:12px 0 4px;color:#445}
table{border-collapse:collapse;margin:6px 0 12px;width:100%}table.kv th{width:170px}
th,td{border:1px solid #d5d9e2;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f4f8;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px}
.ok{color:#1f7a32;font-weight:600}.bad{color:#b0202a;font-weight:600}.muted{color:#667}
.box{border:1px solid #d5d9e2;border-radius:6px;padding:10px 14px;margin:10px 0}
.box.ok{border-color:#3c9a4d;background:#f1faf2}.box.bad{border-color:#b0202a;background:#fdf1f1}
.legend span{display:inline-block;margin-right:14px;font-size:12.5px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
svg.timeline{width:100%;height:auto;border:1px solid #e3e6ee;background:#fbfcfe}
pre{white-space:pre-wrap;background:#f6f7f9;border:1px solid #e3e6ee;padding:6px 8px;margin:4px 0}
section.node{border-top:2px solid #e3e6ee;margin-top:22px}
"""


def colour(state: str) -> str:
    if state in STATE_COLOURS:
        return STATE_COLOURS[state]
    digest = hashlib.sha256(state.encode()).digest()
    return PALETTE[digest[0] % len(PALETTE)]
