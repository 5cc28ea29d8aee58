"""mitmproxy script: use the Qwen API with Qwen OAuth credentials.

    mitmdump -s addon/qwen_addon.py

Injects the token of ~/.qwen/oauth_creds.json (shared with Qwen Code) into requests for Qwen API
hosts, refreshing it when needed, and runs the OAuth device flow when no login exists.
"""

from qwenproxy.addon import QwenAuth

addons = [QwenAuth()]
