"""Results users can use: answers checked, failures escalated, slow tails hedged.

A layer above the engine (asyncbg/_engine/): every attempt, an escalation step or a hedge copy,
is an engine job of its own under a key derived from the user's, so each keeps the engine's
guarantees (recorded before it is trusted, never sent twice, its own cost). The user's handle is
a job of its own that shows the final answer.
"""

from ._hedge import Hedge
from ._ladder import Escalation
from ._layer import Outcomes

__all__ = ["Escalation", "Hedge", "Outcomes"]
