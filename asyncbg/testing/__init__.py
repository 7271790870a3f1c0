"""asyncbg.testing: an offline, fault-injecting Responses API server for tests and demos.

    server = FakeResponsesServer(latency=LatencyModel.fixed(0.05))
    client = fake_client(server)          # AsyncOpenAI, in-process, no network or API key
    ...
    await client.close()

It also runs as ASGI (``asgi_app(server)``; ``python -m asyncbg fake-server``) and as the pytest
fixtures ``fake_server`` / ``fake_openai``.
"""

from ._faults import Fault, FaultRates
from ._limits import FakeRateLimit
from ._model import LatencyModel, Outcomes
from ._plugin import FakeOpenAI
from ._server import FakeResponsesServer
from ._state import Counters
from ._transport import FakeTransport, asgi_app, fake_client
from ._usage import UsageModel
from ._webhooks import new_secret, sign, signed_delivery
from ._wire import FakeAnswer

__all__ = [
    "Counters",
    "FakeAnswer",
    "FakeOpenAI",
    "FakeRateLimit",
    "FakeResponsesServer",
    "FakeTransport",
    "Fault",
    "FaultRates",
    "LatencyModel",
    "Outcomes",
    "UsageModel",
    "asgi_app",
    "fake_client",
    "new_secret",
    "sign",
    "signed_delivery",
]

# Users import asyncbg.testing.X: say so in reprs and docs, not asyncbg.testing._x.X.
for _name in __all__:
    _value = globals()[_name]
    if getattr(_value, "__module__", "").startswith(__name__ + "."):
        _value.__module__ = __name__
del _name, _value
