"""Every SQL statement of :class:`SQLiteLedger`, to be reviewed together.

Schema history (``PRAGMA user_version``; ``PRAGMA application_id`` marks the file as ours):

- version 1: the journal of asyncbg 0.1 (``asyncbg/_journal.py``), which set neither pragma:
  ``jobs`` with states ``sending | accepted | done | local`` and the body as TEXT, and ``events``.
- version 2: adds ``seq`` (claim order), ``request``, ``error_code``, ``http_status`` and
  ``request_id``; ``accepted`` becomes ``live``; bodies are BLOBs. The column holding the body
  keeps its old name, ``response``.
"""

from __future__ import annotations

# No __all__: the module is a namespace, imported as `q` by _sqlite.py.

#: ``PRAGMA application_id`` of an asyncbg journal: "abgj" in ASCII.
APPLICATION_ID = 0x6162676A
SCHEMA_VERSION = 2

#: The columns of the version 1 tables, to recognise a journal that predates the pragmas.
V1_JOBS_COLUMNS = frozenset({
    "key", "digest", "state", "response_id", "status", "response", "error", "resubmits",
    "created", "updated",
})
V1_EVENTS_COLUMNS = frozenset({"id", "key", "status", "at"})

# Run as separate statements inside one transaction (executescript would commit first).
CREATE_V2 = (
    """
    CREATE TABLE jobs (
        key         TEXT PRIMARY KEY,
        seq         INTEGER NOT NULL,   -- claim order (rowids may change on VACUUM)
        digest      TEXT NOT NULL,
        request     BLOB NOT NULL DEFAULT x'',
        state       TEXT NOT NULL,      -- new | sending | live | done | local
        response_id TEXT,
        status      TEXT NOT NULL,
        response    BLOB,               -- the final Response JSON, as the server sent it
        error       TEXT,
        error_code  TEXT,
        http_status INTEGER,
        request_id  TEXT,
        resubmits   INTEGER NOT NULL DEFAULT 0,
        created     REAL NOT NULL,
        updated     REAL NOT NULL
    )
    """,
    """
    CREATE TABLE events (
        id     INTEGER PRIMARY KEY,
        key    TEXT NOT NULL,
        status TEXT NOT NULL,
        at     REAL NOT NULL
    )
    """,
)
ADD_V2_COLUMNS = (
    "ALTER TABLE jobs ADD COLUMN seq INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN request BLOB NOT NULL DEFAULT x''",
    "ALTER TABLE jobs ADD COLUMN error_code TEXT",
    "ALTER TABLE jobs ADD COLUMN http_status INTEGER",
    "ALTER TABLE jobs ADD COLUMN request_id TEXT",
    "UPDATE jobs SET state = 'live' WHERE state = 'accepted'",
)
BLOB_BODIES = "UPDATE jobs SET response = CAST(response AS BLOB) WHERE typeof(response) = 'text'"
# Version 1 never changed `created` after the insert, so it is the order of first claims.
KEYS_IN_CLAIM_ORDER = "SELECT key FROM jobs ORDER BY created, rowid"
SET_SEQ = "UPDATE jobs SET seq = ? WHERE key = ?"
V2_INDEXES = (
    "CREATE UNIQUE INDEX jobs_seq ON jobs (seq)",
    "CREATE INDEX events_key ON events (key, at)",
)
# Pragmas take no parameters; both values are constants of this module.
V2_MARK = (
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

BEGIN = "BEGIN IMMEDIATE"  # take the write lock now: no deadlock upgrading a read transaction
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"

_COLUMNS = (
    "key, digest, request, state, response_id, status, response, error, error_code, "
    "http_status, request_id, resubmits, created, updated"
)
GET = f"SELECT {_COLUMNS} FROM jobs WHERE key = ?"
RECORDS = f"SELECT {_COLUMNS} FROM jobs ORDER BY seq"
RESUBMITS = "SELECT COALESCE(SUM(resubmits), 0) FROM jobs"

CLAIM_INSERT = """
    INSERT INTO jobs (key, seq, digest, request, state, status, created, updated)
    VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), ?, ?, 'new', 'pending', ?, ?)
    ON CONFLICT (key) DO NOTHING
"""
CLAIM_RESET = """
    UPDATE jobs SET digest = ?, request = ?, state = 'new', response_id = NULL,
        status = 'pending', response = NULL, error = NULL, error_code = NULL,
        http_status = NULL, request_id = NULL, updated = ?
    WHERE key = ?
"""
CLAIM_RESEND = "UPDATE jobs SET request = ?, status = 'pending', updated = ? WHERE key = ?"
CLAIM_FILL_REQUEST = "UPDATE jobs SET request = ? WHERE key = ? AND length(request) = 0"

SENDING = """
    UPDATE jobs SET state = 'sending', response_id = NULL, status = 'pending',
        resubmits = resubmits + ?, updated = ?
    WHERE key = ?
"""
RECORD_LIVE = """
    UPDATE jobs SET state = 'live', response_id = COALESCE(?, response_id), status = ?,
        updated = ?
    WHERE key = ?
"""
RECORD_TERMINAL = """
    UPDATE jobs SET state = ?, response_id = COALESCE(?, response_id), status = ?,
        response = ?, error = ?, error_code = ?, http_status = ?, request_id = ?, updated = ?
    WHERE key = ?
"""
EVENT = "INSERT INTO events (key, status, at) VALUES (?, ?, ?)"

# Reading what a file holds, before anything is written to it.
READ_APPLICATION_ID = "PRAGMA application_id"
READ_USER_VERSION = "PRAGMA user_version"
READ_TABLES = (
    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite!_%' ESCAPE '!'"
)
READ_COLUMNS = "SELECT name FROM pragma_table_info(?)"
QUICK_CHECK = "PRAGMA quick_check"
# NORMAL survives a killed process (the WAL is in the OS's hands once written); only a power
# loss could drop the last commits.
CONNECTION_SETUP = ("PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL")
