"""asyncbg.testing: an offline, fault-injecting Responses API server for tests and demos.

    server = FakeResponsesServer(latency=LatencyModel.fixed(0.05))
    client = fake_client(server)          # AsyncOpenAI, in-process, no network or API key
    ...
    await client.close()

It also runs as ASGI (``asgi_app(server)``; ``python -m asyncbg fake-server``) and as the pytest
fixtures ``fake_server`` / ``fake_openai``. The same server serves the batch APIs of OpenAI
(``/v1/files``, ``/v1/batches``), Anthropic (``/v1/messages/batches``) and Gemini
(``batchGenerateContent``, ``/v1beta/batches``): see :class:`FakeBatches`,
:func:`fake_anthropic_client` and :func:`fake_genai_client`. :class:`WebhookReceiver` is the
other end of ``BackgroundManager(notify=...)``: it verifies and records signed notifications.
"""

from ._batch_core import BatchTiming
from ._batches import FakeBatches
from ._clients import fake_anthropic_client, fake_genai_client
from ._faults import Fault, FaultRates
from ._limits import FakeRateLimit
from ._model import LatencyModel, Outcomes
from ._plugin import FakeOpenAI
from ._receiver import ReceivedWebhook, WebhookReceiver
from ._server import FakeResponsesServer
from ._state import Counters
from ._transport import FakeTransport, asgi_app, fake_client
from ._usage import UsageModel
from ._webhooks import new_secret, sign, signed_delivery
from ._wire import FakeAnswer

__all__ = [
    "BatchTiming",
    "Counters",
    "FakeAnswer",
    "FakeBatches",
    "FakeOpenAI",
    "FakeRateLimit",
    "FakeResponsesServer",
    "FakeTransport",
    "Fault",
    "FaultRates",
    "LatencyModel",
    "Outcomes",
    "ReceivedWebhook",
    "UsageModel",
    "WebhookReceiver",
    "asgi_app",
    "fake_anthropic_client",
    "fake_client",
    "fake_genai_client",
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
