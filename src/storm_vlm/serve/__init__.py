"""Serving a STORM model: `StormEngine` (load once, answer questions about videos), the HTTP API
(`storm_vlm.serve.api.create_app`, FastAPI) and the web demo (`storm_vlm.serve.web.build_demo`,
gradio). The API and the demo import their frameworks only when used."""

from storm_vlm.serve.engine import StormEngine

__all__ = ["StormEngine"]
