"""Database URLs and connection strings in messages: never with their password.

:func:`redacted` is the one function every message, log line, ``status`` line and ``--json``
field that can hold a ledger's location goes through. It takes any text (a URL, a libpq
``key=value`` string, an error message quoting either) and hides:

- the password of a URL's user-info (``postgresql://user:PW@host``), even an un-encoded one
  holding ``@``, ``:`` or ``/`` (everything up to the last ``@`` is user-info then: showing too
  little is the safe mistake);
- ``password=`` and ``sslpassword=`` parameters, in a URL's query or a ``key=value`` string,
  quoted (``password='a b'``) or not;
- the same in URLs that lack a slash (``postgresql:/user:PW@host``), which libpq refuses but a
  user may type.

:func:`url_like` says whether a ledger argument is meant as a URL (and must then parse as one),
as opposed to the path of an SQLite journal.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["SECRET", "redacted", "url_like"]

#: What a password is shown as.
SECRET = "***"

#: A URL's start: a scheme of two letters or more (not ``C:`` on Windows) and one or more
#: slashes, or a PostgreSQL scheme and a colon alone. Then the URL runs to the next whitespace.
_URL = re.compile(r"(?i)\b((?:[a-z][a-z0-9+.-]+:/+)|(?:postgres(?:ql)?:))(\S*)")
#: ``password=`` in a ``key=value`` string: quoted (backslash escapes) or up to whitespace.
_KEYWORD = re.compile(r"(?i)\b((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)")
_SECRET_KEYS = frozenset({"password", "sslpassword"})
#: A ledger argument that starts like a URL: ``word:`` then a slash, or a PostgreSQL scheme.
_URL_LIKE = re.compile(r"(?i)^(?:[a-z][a-z0-9+.-]+:/|postgres(?:ql)?:)")


def redacted(text: str) -> str:
    """``text`` with every password in it replaced by ``***`` (see the module docstring)."""
    out: list[str] = []
    end = 0
    for match in _URL.finditer(text):
        out.append(_KEYWORD.sub(_hide_keyword, text[end:match.start()]))
        out.append(match.group(1) + _redact_url_rest(match.group(2)))
        end = match.end()
    out.append(_KEYWORD.sub(_hide_keyword, text[end:]))
    return "".join(out)


def url_like(text: str) -> bool:
    """Whether a ledger argument is meant as a URL (``scheme:/...``, ``postgresql:...``)."""
    return _URL_LIKE.match(text) is not None


def _hide_keyword(match: re.Match[str]) -> str:
    return match.group(1) + SECRET


def _redact_url_rest(rest: str) -> str:
    """A URL after its ``scheme://``: user-info password and secret query parameters hidden."""
    netloc_end = len(rest)
    for sep in "/?#":
        at = rest.find(sep)
        if at != -1:
            netloc_end = min(netloc_end, at)
    if "@" in rest[:netloc_end] and "@" not in rest[netloc_end:]:
        at = rest.rindex("@", 0, netloc_end)
    else:  # none, or an un-encoded "@" (or "/") in the password: the last "@" ends user-info
        at = rest.rfind("@")
    if at != -1:
        user, colon, password = rest[:at].partition(":")
        if colon and password:
            rest = f"{user}:{SECRET}{rest[at:]}"
    head, mark, query = rest.partition("?")
    if not mark:
        return rest
    query, hash_, fragment = query.partition("#")
    params = []
    for param in query.split("&"):
        key, eq, _ = param.partition("=")
        params.append(f"{key}={SECRET}" if eq and unquote(key).strip().lower() in _SECRET_KEYS
                      else param)
    return f"{head}?{'&'.join(params)}{hash_}{fragment}"
