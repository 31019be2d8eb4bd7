"""The Gradio web app: pick a model, upload an image, drag τ, see and measure what ALGM merges.

``build_demo()`` returns the Blocks; ``app.py`` at the repository root launches it.
"""

from .ui import build_demo

__all__ = ["build_demo"]
