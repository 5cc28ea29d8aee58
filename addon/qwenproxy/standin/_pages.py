"""The verification pages a user sees in the browser during a device flow (demo-grade HTML)."""

from __future__ import annotations

from html import escape

_STYLE = """
body { margin: 0; min-height: 100vh; display: flex; align-items: center; justify-content: center;
       background: linear-gradient(135deg, #eef2ff, #f8fafc); color: #1e293b;
       font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { background: #fff; border-radius: 16px; box-shadow: 0 10px 40px rgba(30, 41, 59, .12);
       padding: 40px 48px; max-width: 420px; text-align: center; }
h1 { font-size: 22px; margin: 0 0 8px; }
p { color: #475569; margin: 8px 0; }
.badge { display: inline-block; font-size: 12px; letter-spacing: .08em; text-transform: uppercase;
         color: #6366f1; background: #eef2ff; border-radius: 999px; padding: 2px 10px; }
.code { font: 600 32px/1 ui-monospace, SFMono-Regular, Menlo, monospace; letter-spacing: .12em;
        background: #f1f5f9; border-radius: 10px; padding: 16px 20px; margin: 24px 0; }
.buttons { display: flex; gap: 12px; justify-content: center; margin-top: 24px; }
button, input { font: inherit; border-radius: 10px; padding: 10px 22px; }
button { border: 0; cursor: pointer; font-weight: 600; }
.approve { background: #4f46e5; color: #fff; }
.deny { background: #e2e8f0; color: #1e293b; }
input { border: 1px solid #cbd5e1; text-transform: uppercase; text-align: center; }
.ok { color: #15803d; } .no { color: #b91c1c; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)} · Qwen stand-in</title><style>{_STYLE}</style></head>"
        f"<body><main><span class='badge'>Qwen stand-in</span>{body}</main></body></html>\n"
    )


def confirm(user_code: str) -> str:
    """Asks the user to approve or deny the device showing `user_code`."""
    code = escape(user_code)
    return _page(
        "Authorize device",
        "<h1>Authorize Qwen Code</h1>"
        "<p>A device is asking to use your Qwen account. "
        "Check that it shows this code:</p>"
        f"<div class='code'>{code}</div>"
        "<form method='post' action='/authorize'>"
        f"<input type='hidden' name='user_code' value='{code}'>"
        "<div class='buttons'>"
        "<button class='approve' type='submit' name='action' value='approve'>Approve</button>"
        "<button class='deny' type='submit' name='action' value='deny'>Deny</button>"
        "</div></form>",
    )


def enter_code() -> str:
    """Asks for a user code when the link carried none."""
    return _page(
        "Enter code",
        "<h1>Connect a device</h1><p>Enter the code your device shows.</p>"
        "<form method='get' action='/authorize'>"
        "<div class='buttons'><input name='user_code' placeholder='ABCD-1234' required>"
        "<button class='approve' type='submit'>Continue</button></div></form>",
    )


def outcome(title: str, message: str, ok: bool) -> str:
    """The page after a decision, or an error about the code."""
    css = "ok" if ok else "no"
    return _page(title, f"<h1 class='{css}'>{escape(title)}</h1><p>{escape(message)}</p>")
