"""Debian's Chromium for the browser tests: Playwright drives it through executable_path, so no
browser is ever downloaded."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
# Headless as root, with nothing that reaches for Google's hosts (this network refuses them).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--autoplay-policy=no-user-gesture-required",
]
