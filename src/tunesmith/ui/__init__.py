"""The local dashboard: start, watch and compare runs in a browser, over the same run folders the CLI writes."""
from .server import make_server, serve

__all__ = ["make_server", "serve"]
