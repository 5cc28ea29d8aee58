"""Use the Qwen API with Qwen OAuth credentials through mitmproxy.

Modules, one concern each:
- `profile`: Qwen's constants (URLs, client id, hosts, headers).
- `store`: the credential file shared with Qwen Code, and its cross-process lock.
- `oauth`: the OAuth device flow and refresh over httpx.
- `tokens`: the token lifecycle; one refresh and one login at a time.
- `addon`: the mitmproxy face (options, hooks, commands).
- `standin`: a local stand-in of Qwen's OAuth and API servers for tests and the demo.
- `cli`: `python -m qwenproxy login | status | logout`.
"""

__version__ = "0.1.0"
