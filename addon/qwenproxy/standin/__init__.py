"""A local stand-in of Qwen's OAuth and API servers, for the test suite and the demo.

    from qwenproxy.standin import StandIn, Fault

    with StandIn(cert_dir=tmp_path) as s:
        httpx.get(f"{s.base_url}/v1/models", verify=str(s.ca_path), headers=...)

It is strict like a real server: wrong client ids, content types, PKCE verifiers, polls that come
too fast and stale tokens all get the errors Qwen sends. `python -m qwenproxy.standin` runs one in
the foreground.
"""

from ._server import StandIn
from ._service import ENDPOINTS, Fault, RecordedRequest

__all__ = ["ENDPOINTS", "Fault", "RecordedRequest", "StandIn"]
