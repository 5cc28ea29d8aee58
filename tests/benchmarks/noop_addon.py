"""A mitmproxy script whose addon has the Qwen addon's hooks, each doing nothing.

    mitmdump -s tests/benchmarks/noop_addon.py

The overhead benchmark runs it as a third variant: what mitmproxy charges for loading a script
addon with these hooks at all (script loader, hook dispatch, coroutine per async hook), so the Qwen
addon's own cost is what it adds on top of this.
"""


class NoopHooks:
    async def requestheaders(self, flow) -> None:
        return None

    async def request(self, flow) -> None:
        return None

    def responseheaders(self, flow) -> None:
        return None

    async def response(self, flow) -> None:
        return None

    def error(self, flow) -> None:
        return None


addons = [NoopHooks()]
