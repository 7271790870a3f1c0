"""Every SQL statement of :class:`SQLiteLedger`, to be reviewed together.

Schema history (``PRAGMA user_version``; ``PRAGMA application_id`` marks the file as ours):

- version 1: the journal of asyncbg 0.1 (``asyncbg/_journal.py``), which set neither pragma:
  ``jobs`` with states ``sending | accepted | done | local`` and the body as TEXT, and ``events``.
- version 2: adds ``seq`` (claim order), ``request``, ``error_code``, ``http_status`` and
  ``request_id``; ``accepted`` becomes ``live``; bodies are BLOBs. The column holding the body
  keeps its old name, ``response``.
- version 3: leases, for several processes sharing one journal (:mod:`._sqlite_shared`):
  ``owner``, ``epoch`` and ``lease_until`` on ``jobs``, and a ``workers`` table. A plain
  :class:`SQLiteLedger` leaves them empty.
- version 4: the ``outbox`` table of webhook notifications (see :mod:`._outbox`), each written
  in the transaction of the outcome it announces and deleted once a receiver answered 2xx.

Beside the versions, added to a journal of any version the first time it is opened for writing
(so that no version number is taken): ``job_counts``, the number of jobs per state and status,
kept exact by triggers in the transaction of every write, so that a reader (the dashboard, on a
read-only connection) counts a million jobs by reading a dozen rows.

What a shared journal adds (:mod:`._sqlite_shared`, on open, idempotent, so a plain
:class:`SQLiteLedger` neither needs nor minds them): ``sent_epoch``, the epoch a ``sending``
record was written at (a takeover of a key whose create may be in flight waits one more safety
margin), and the partial indexes a claim reads, so that it costs the same at a million jobs as
at ten (``SHARED_SCHEMA``).
"""

from __future__ import annotations

# No __all__: the module is a namespace, imported as `q` by _sqlite.py.

#: ``PRAGMA application_id`` of an asyncbg journal: "abgj" in ASCII.
APPLICATION_ID = 0x6162676A
SCHEMA_VERSION = 4

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
UPGRADE_V3 = (
    "ALTER TABLE jobs ADD COLUMN owner TEXT",  # the lease holder
    "ALTER TABLE jobs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",  # bumped by every takeover
    "ALTER TABLE jobs ADD COLUMN lease_until REAL",  # NULL: nobody holds it
    "CREATE INDEX jobs_open ON jobs (seq) WHERE state IN ('new', 'sending', 'live')",
    """
    CREATE TABLE workers (
        owner   TEXT PRIMARY KEY,
        host    TEXT NOT NULL,
        pid     INTEGER NOT NULL,
        started REAL NOT NULL,
        seen    REAL NOT NULL,
        lease   REAL NOT NULL
    )
    """,
)
UPGRADE_V4 = (
    """
    CREATE TABLE outbox (
        id          TEXT PRIMARY KEY,   -- the webhook-id
        key         TEXT NOT NULL,
        url         TEXT NOT NULL,
        body        BLOB NOT NULL,      -- posted and signed as it is, on every attempt
        state       TEXT NOT NULL DEFAULT 'pending',  -- pending | failed
        attempts    INTEGER NOT NULL DEFAULT 0,
        created     REAL NOT NULL,
        next_at     REAL NOT NULL,      -- due time of the next attempt
        owner       TEXT,               -- the sender posting it now, until lease_until
        lease_until REAL,
        error       TEXT,               -- why the last attempt failed
        http_status INTEGER
    )
    """,
    "CREATE INDEX outbox_pending ON outbox (url, next_at) WHERE state = 'pending'",
)
HAS_COUNTS = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'job_counts'"
# Made and filled in one transaction under the write lock: no write between the count and the
# triggers that keep it. Updates count only when a state or status changes.
CREATE_COUNTS = (
    """
    CREATE TABLE job_counts (
        state  TEXT NOT NULL,
        status TEXT NOT NULL,
        n      INTEGER NOT NULL,
        PRIMARY KEY (state, status)
    ) WITHOUT ROWID
    """,
    """
    CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts (state, status, n) VALUES (NEW.state, NEW.status, 1)
        ON CONFLICT (state, status) DO UPDATE SET n = n + 1;
    END
    """,
    """
    CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1 WHERE state = OLD.state AND status = OLD.status;
    END
    """,
    """
    CREATE TRIGGER job_counts_update AFTER UPDATE OF state, status ON jobs
    WHEN OLD.state IS NOT NEW.state OR OLD.status IS NOT NEW.status BEGIN
        UPDATE job_counts SET n = n - 1 WHERE state = OLD.state AND status = OLD.status;
        INSERT INTO job_counts (state, status, n) VALUES (NEW.state, NEW.status, 1)
        ON CONFLICT (state, status) DO UPDATE SET n = n + 1;
    END
    """,
    "INSERT INTO job_counts (state, status, n) "
    "SELECT state, status, count(*) FROM jobs GROUP BY state, status",
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
#: Params: after (a seq), limit. One page of RECORDS, from the seq index.
RECORDS_PAGE = f"SELECT seq, {_COLUMNS} FROM jobs WHERE seq > ? ORDER BY seq LIMIT ?"
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
#: A response a stopped run kept in ``JOURNAL.unrecorded``: its create was answered and the
#: journal never took the id. Only a ``sending`` record without an id takes it.
ADOPT_KEPT = """
    UPDATE jobs SET state = 'live', response_id = ?, status = 'in_progress', updated = ?
    WHERE key = ? AND state = 'sending' AND response_id IS NULL
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

# -- shared journals: leases (version 3; see _sqlite_shared.py) ----------------------------------
# Times are time.time() of the processes sharing the file: one machine, one clock.

SHARED_CLAIM_INSERT = """
    INSERT INTO jobs (key, seq, digest, request, state, status, created, updated, owner, epoch,
                      lease_until)
    VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), ?, ?, 'new', 'pending', ?, ?, ?, 1,
            ?)
    ON CONFLICT (key) DO NOTHING
"""
#: When a lease can be taken over: once it ran out, and one safety margin later when its
#: holder's create may be in flight (it wrote ``sending`` at its epoch).
_TAKEN_OVER_AT = ("lease_until + CASE WHEN state = 'sending' AND sent_epoch = epoch "
                  "THEN :margin ELSE 0 END")
# Params: margin, key.
LEASE_OF = f"SELECT owner, {_TAKEN_OVER_AT} FROM jobs WHERE key = :key"
# Params: owner, lease_until, key. Every takeover bumps the epoch.
TAKE_LEASE = "UPDATE jobs SET owner = ?, epoch = epoch + 1, lease_until = ? WHERE key = ? " \
    "RETURNING epoch"
_FENCE = " AND owner = ? AND epoch = ?"
# The record carries the epoch it was sent at (see _TAKEN_OVER_AT).
SHARED_SENDING = """
    UPDATE jobs SET state = 'sending', response_id = NULL, status = 'pending',
        resubmits = resubmits + ?, updated = ?, sent_epoch = epoch
    WHERE key = ?""" + _FENCE
SHARED_RECORD_LIVE = RECORD_LIVE.rstrip() + _FENCE
# A finished key needs no lease any more.
SHARED_RECORD_TERMINAL = """
    UPDATE jobs SET state = ?, response_id = COALESCE(?, response_id), status = ?,
        response = ?, error = ?, error_code = ?, http_status = ?, request_id = ?, updated = ?,
        lease_until = NULL
    WHERE key = ?""" + _FENCE
EXISTS = "SELECT 1 FROM jobs WHERE key = ?"
# Params: response_id, now, key, epoch, digest. A fleet worker's kept response (see
# _rescue.py): taken by a row with no response id that is still `sending` at the epoch it was
# sent at, or, for the same request, with nobody holding a live lease on it: put back to
# waiting (`new`), ended without a response (`local`: nothing was paid for it), or `sending`
# at a later epoch by a worker gone since (its create may have left: counted a possible
# duplicate; creating the line once more could only add one). Then live, with no owner (any
# worker takes it to poll it), and a new epoch (a holder since is fenced off).
ADOPT_KEPT_FENCED = """
    UPDATE jobs SET state = 'live', response_id = :response_id, status = 'in_progress',
        updated = :now, owner = NULL, lease_until = NULL, epoch = epoch + 1, error = NULL,
        error_code = NULL, http_status = NULL, request_id = NULL,
        resubmits = resubmits + (state = 'sending' AND sent_epoch IS NOT :epoch)
    WHERE key = :key AND response_id IS NULL
      AND ((state = 'sending' AND sent_epoch = :epoch)
           OR (state IN ('new', 'local', 'sending') AND digest = :digest
               AND (owner IS NULL OR lease_until IS NULL OR lease_until <= :now)))
"""
ROW_OF = "SELECT state, response_id FROM jobs WHERE key = ?"

# Waiting jobs: no owner.
ENQUEUE = """
    INSERT INTO jobs (key, seq, digest, request, state, status, created, updated)
    VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), ?, ?, 'new', 'pending', ?, ?)
    ON CONFLICT (key) DO NOTHING
"""
DIGEST_OF = "SELECT digest FROM jobs WHERE key = ?"
_OPEN = "state IN ('new', 'sending', 'live')"
#: Made by a shared journal on open (CREATE ... IF NOT EXISTS, in one transaction); the column
#: is added first when missing (ADD_SENT_EPOCH). What a claim reads: waiting rows in claim
#: order (waiting live ones have their own, for a full worker that adopts only those), and
#: leases by when they run out; no claim reads a row that is leased and running.
ADD_SENT_EPOCH = "ALTER TABLE jobs ADD COLUMN sent_epoch INTEGER"
SHARED_INDEXES = (
    f"CREATE INDEX IF NOT EXISTS jobs_waiting ON jobs (seq) WHERE lease_until IS NULL AND {_OPEN}",
    "CREATE INDEX IF NOT EXISTS jobs_waiting_live ON jobs (seq) "
    "WHERE lease_until IS NULL AND state = 'live'",
    "CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (lease_until) "
    f"WHERE lease_until IS NOT NULL AND {_OPEN}",
)
#: Whether the above are all there (a read, so that an open takes no write lock for them).
SHARED_SCHEMA_THERE = """
    SELECT (SELECT count(*) FROM pragma_table_info('jobs') WHERE name = 'sent_epoch')
         + (SELECT count(*) FROM sqlite_master WHERE type = 'index'
            AND name IN ('jobs_waiting', 'jobs_waiting_live', 'jobs_leased'))
"""
SHARED_SCHEMA_PARTS = 4
# Params: now, limit, margin. Run under BEGIN IMMEDIATE: no other writer between the pick and
# the take. Each part walks its partial index and stops at `limit` rows.
_ACQUIRE = f"""
    SELECT key FROM (
        SELECT key, seq FROM (
            SELECT key, seq FROM jobs INDEXED BY {{waiting}}
            WHERE lease_until IS NULL AND {{states}}
            ORDER BY seq LIMIT :limit)
        UNION ALL
        SELECT key, seq FROM (
            SELECT key, seq FROM jobs INDEXED BY jobs_leased
            WHERE lease_until <= :now AND {_OPEN} AND {{states}}
              AND {_TAKEN_OVER_AT} <= :now
            ORDER BY lease_until LIMIT :limit))
    ORDER BY seq LIMIT :limit
"""
ACQUIRE = _ACQUIRE.format(waiting="jobs_waiting", states=_OPEN)
ACQUIRE_LIVE = _ACQUIRE.format(waiting="jobs_waiting_live", states="state = 'live'")
# Params: lease_until, key, epoch, owner.
RENEW = """
    UPDATE jobs SET lease_until = ?
    WHERE key = ? AND epoch = ? AND owner = ? AND state IN ('new', 'sending', 'live')
"""
# Params: owner, host, pid, started, seen, lease.
HEARTBEAT = """
    INSERT INTO workers (owner, host, pid, started, seen, lease) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (owner) DO UPDATE SET seen = excluded.seen, lease = excluded.lease
"""
# Params: key, epoch, owner. The epoch stays: the next taker bumps it.
RELEASE = "UPDATE jobs SET owner = NULL, lease_until = NULL WHERE key = ? AND epoch = ? " \
    "AND owner = ?"
# Params: now, key, owner, codes, codes (a JSON list, or NULL: any code). Back to waiting:
# only what this owner ended locally (nothing paid).
REQUEUE = """
    UPDATE jobs SET state = 'new', response_id = NULL, status = 'pending', response = NULL,
        error = NULL, error_code = NULL, http_status = NULL, request_id = NULL, owner = NULL,
        lease_until = NULL, updated = ?
    WHERE key = ? AND owner = ? AND state = 'local'
      AND (? IS NULL OR error_code IN (SELECT value FROM json_each(?)))
"""
# Params: now, code, code. Never a key with a response id: that one was paid for.
REQUEUE_UNPAID = """
    UPDATE jobs SET state = 'new', status = 'pending', response = NULL, error = NULL,
        error_code = NULL, http_status = NULL, request_id = NULL, owner = NULL,
        lease_until = NULL, updated = ?
    WHERE state = 'local' AND response_id IS NULL AND (? IS NULL OR error_code = ?)
"""
# A fleet's ledger rather than a run's journal: a key was leased (by a worker or a shared
# manager); `asyncbg run` never leases.
USED_BY_A_FLEET = "SELECT EXISTS (SELECT 1 FROM jobs WHERE epoch > 0)"
# Params: now, now.
WORKERS = """
    SELECT w.owner, w.host, w.pid, w.started, w.seen, w.lease,
           (SELECT count(*) FROM jobs j WHERE j.owner = w.owner AND j.lease_until > ?
              AND j.state IN ('new', 'sending', 'live'))
    FROM workers w WHERE w.seen + w.lease > ? ORDER BY w.started, w.owner
"""
FORGET_WORKER = "DELETE FROM workers WHERE owner = ?"
FORGET_OLD_WORKERS = "DELETE FROM workers WHERE seen < ?"
UNFINISHED = "SELECT count(*) FROM jobs WHERE state IN ('new', 'sending', 'live')"

# -- the outbox (version 4; see _sqlite_outbox.py) ------------------------------------------------

# Params: id, key, url, body, created, next_at. Inside the outcome's own transaction.
OUTBOX_ADD = """
    INSERT INTO outbox (id, key, url, body, created, next_at) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (id) DO NOTHING
"""
# Params: now, url, owner, lease, limit. One statement picks and leases (SQLite holds the write
# lock for it): no other sender between the two. RETURNING comes in no order: the caller sorts
# by the last column, next_at. One endpoint's (the sender's case) walks the index in due
# order; any endpoint's (``asyncbg notify``) scans.
_TAKE = """
    UPDATE outbox SET owner = ?3, lease_until = ?1 + ?4
    WHERE id IN (
        SELECT id FROM outbox
        WHERE state = 'pending' AND {url} AND next_at <= ?1
          AND (lease_until IS NULL OR lease_until <= ?1)
        ORDER BY next_at LIMIT ?5)
    RETURNING id, key, url, body, state, attempts, ?1 - created, error, http_status, next_at
"""
OUTBOX_TAKE = _TAKE.format(url="url = ?2")
OUTBOX_TAKE_ANY = _TAKE.format(url="?2 IS NULL")
_DELIVERY = "id, key, url, body, state, attempts, ? - created, error, http_status"
# Params: ids, as a JSON array (one statement, however many).
OUTBOX_DONE = "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))"
# Params: ids (a JSON array), owner.
OUTBOX_RELEASE = """
    UPDATE outbox SET owner = NULL, lease_until = NULL
    WHERE id IN (SELECT value FROM json_each(?)) AND owner = ?
"""
# What every sender holds, handed back (a run opening its journal: the holders are gone).
OUTBOX_RELEASE_ALL = "UPDATE outbox SET owner = NULL, lease_until = NULL WHERE owner IS NOT NULL"
# Params: state, next_at, error, http_status, id, owner.
OUTBOX_FAILED = """
    UPDATE outbox SET state = ?, next_at = ?, error = ?, http_status = ?,
        attempts = attempts + 1, owner = NULL, lease_until = NULL
    WHERE id = ? AND owner = ? AND state = 'pending'
"""
# Params: now, url.
OUTBOX_DELIVER_NOW = """
    UPDATE outbox SET next_at = ?1
    WHERE state = 'pending' AND url = ?2 AND next_at > ?1
      AND (lease_until IS NULL OR lease_until <= ?1)
"""
# Params: error, url, cutoff (created before it; NULL: all).
OUTBOX_FAIL_ALL = """
    UPDATE outbox SET state = 'failed', error = ?
    WHERE state = 'pending' AND url = ? AND (?3 IS NULL OR created < ?3)
"""
# Params: now, now, url (NULL: any).
OUTBOX_RETRY_FAILED = """
    UPDATE outbox SET state = 'pending', created = ?, next_at = ?, owner = NULL,
        lease_until = NULL
    WHERE state = 'failed' AND (?3 IS NULL OR url = ?3)
"""
# Params: url, held (1: count leased ones too), now.
_NEXT = """
    SELECT min(max(next_at, COALESCE(lease_until, 0))) FROM outbox
    WHERE state = 'pending' AND {url} AND (?2 OR lease_until IS NULL OR lease_until <= ?3)
"""
OUTBOX_NEXT = _NEXT.format(url="url = ?1")
OUTBOX_NEXT_ANY = _NEXT.format(url="?1 IS NULL")
# Params: now.
OUTBOX_ALL = f"SELECT {_DELIVERY} FROM outbox ORDER BY created, rowid"

# -- the overview (``asyncbg status``; see _overview.py) -----------------------------------------
# Added to a journal of any version the first time it is opened for writing, like job_counts:
# ``job_tallies`` (one row) sums what ``status`` reports beside the counts (possible duplicates,
# tokens of the final bodies, how many keys were ever leased), kept by triggers in the
# transaction of every write; partial indexes hold the rows it lists (live, sending, and the
# jobs of remote batches). So ``status`` reads a dozen rows plus those it lists, at any size.


def _tokens(body: str) -> str:
    """A query of one row (i, o): the input and output tokens of the final body ``body`` (a
    BLOB), as :func:`asyncbg._cli._output.tokens_of` counts them: the first of ``usage``,
    ``usageMetadata``, ``usage_metadata`` that is truthy, read as OpenAI's (Responses),
    Anthropic's (``cache_*`` present), Gemini's or Chat Completions' usage. A body that is not
    JSON, or not an object, counts nothing (never an error: a write is never refused for it)."""
    def truthy(path: str) -> str:
        return (f"CASE json_type(b, '{path}') WHEN 'object' THEN b -> '{path}' <> '{{}}' "
                f"WHEN 'array' THEN b -> '{path}' <> '[]' WHEN 'true' THEN 1 "
                f"WHEN 'integer' THEN (b ->> '{path}') <> 0 WHEN 'real' THEN (b ->> '{path}') <> 0 "
                f"WHEN 'text' THEN (b ->> '{path}') <> '' ELSE 0 END")

    def first(path: str) -> str:
        return f"WHEN {truthy(path)} THEN CASE WHEN json_type(b, '{path}') = 'object' " \
               f"THEN b -> '{path}' END"

    def n(name: str) -> str:
        return f"coalesce(u ->> '$.{name}', 0)"

    def has(name: str) -> str:
        return f"json_type(u, '$.{name}') IS NOT NULL"

    def given(name: str) -> str:  # present and not null
        return f"coalesce(json_type(u, '$.{name}'), 'null') <> 'null'"

    anthropic = f"({given('cache_read_input_tokens')} OR {given('cache_creation_input_tokens')})"
    gemini = f"({has('promptTokenCount')} OR {has('candidatesTokenCount')})"
    return f"""
        SELECT CASE WHEN u IS NULL THEN 0
                    WHEN {has('input_tokens')} THEN {n('input_tokens')} + CASE WHEN {anthropic}
                        THEN {n('cache_read_input_tokens')} + {n('cache_creation_input_tokens')}
                        ELSE 0 END
                    WHEN {gemini} THEN {n('promptTokenCount')}
                    WHEN {has('prompt_tokens')} THEN {n('prompt_tokens')}
                    ELSE 0 END AS i,
               CASE WHEN u IS NULL THEN 0
                    WHEN {has('input_tokens')} THEN {n('output_tokens')}
                    WHEN {gemini} THEN {n('candidatesTokenCount')} + {n('thoughtsTokenCount')}
                    WHEN {has('prompt_tokens')} THEN {n('completion_tokens')}
                    ELSE 0 END AS o
        FROM (SELECT CASE WHEN json_type(u1, '$.input_tokens') IS NULL
                               AND json_type(u1, '$.usageMetadata') IS NOT NULL
                          THEN CASE WHEN json_type(u1, '$.usageMetadata') = 'object'
                                    THEN u1 -> '$.usageMetadata' END
                          ELSE u1 END AS u
              FROM (SELECT CASE {first('$.usage')} {first('$.usageMetadata')}
                                {first('$.usage_metadata')} END AS u1
                    FROM (SELECT CASE WHEN {body} IS NOT NULL AND json_valid(CAST({body} AS TEXT))
                                       AND json_type(CAST({body} AS TEXT)) = 'object'
                                      THEN CAST({body} AS TEXT) END AS b)))
    """


#: Params: body (a BLOB). What the triggers add, for tests and for readers that want one body.
TOKENS = _tokens(":body")
HAS_TALLIES = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'job_tallies'"
_TALLY = "INSERT INTO job_tallies (id, resubmits, input, output, leased) SELECT 0, {rows} " \
    "WHERE true ON CONFLICT (id) DO UPDATE SET resubmits = resubmits + excluded.resubmits, " \
    "input = input + excluded.input, output = output + excluded.output, " \
    "leased = leased + excluded.leased;"
#: Made and filled in one transaction under the write lock (as CREATE_COUNTS). The triggers
#: fire only for rows that change a sum: an enqueue (no body, no resubmit, no lease) costs
#: nothing, nor a renewal.
CREATE_TALLIES = (
    """
    CREATE TABLE job_tallies (
        id        INTEGER PRIMARY KEY CHECK (id = 0),
        resubmits INTEGER NOT NULL,
        input     INTEGER NOT NULL,
        output    INTEGER NOT NULL,
        leased    INTEGER NOT NULL      -- keys ever leased (epoch > 0): a fleet's ledger
    )
    """,
    f"""
    CREATE TRIGGER job_tallies_insert AFTER INSERT ON jobs
    WHEN NEW.resubmits <> 0 OR NEW.response IS NOT NULL OR NEW.epoch > 0 BEGIN
        {_TALLY.format(rows="NEW.resubmits, t.i, t.o, NEW.epoch > 0 FROM ("
                       + _tokens("NEW.response") + ") AS t")}
    END
    """,
    f"""
    CREATE TRIGGER job_tallies_delete AFTER DELETE ON jobs
    WHEN OLD.resubmits <> 0 OR OLD.response IS NOT NULL OR OLD.epoch > 0 BEGIN
        {_TALLY.format(rows="-OLD.resubmits, -t.i, -t.o, -(OLD.epoch > 0) FROM ("
                       + _tokens("OLD.response") + ") AS t")}
    END
    """,
    f"""
    CREATE TRIGGER job_tallies_update AFTER UPDATE OF resubmits, response, epoch ON jobs
    WHEN OLD.resubmits IS NOT NEW.resubmits OR OLD.response IS NOT NEW.response
         OR (OLD.epoch > 0) IS NOT (NEW.epoch > 0) BEGIN
        {_TALLY.format(rows="NEW.resubmits - OLD.resubmits, n.i - o.i, n.o - o.o, "
                       "(NEW.epoch > 0) - (OLD.epoch > 0) FROM ("
                       + _tokens("NEW.response") + ") AS n, ("
                       + _tokens("OLD.response") + ") AS o")}
    END
    """,
    "INSERT INTO job_tallies (id, resubmits, input, output, leased) "
    "SELECT 0, COALESCE(sum(resubmits), 0), "
    f"COALESCE(sum((SELECT t.i FROM ({_tokens('jobs.response')}) AS t)), 0), "
    f"COALESCE(sum((SELECT t.o FROM ({_tokens('jobs.response')}) AS t)), 0), "
    "COALESCE(sum(epoch > 0), 0) FROM jobs",
    # What status lists, each through its own index (the query repeats the index's condition).
    "CREATE INDEX IF NOT EXISTS jobs_live ON jobs (seq) WHERE state = 'live'",
    "CREATE INDEX IF NOT EXISTS jobs_sending ON jobs (seq) WHERE state = 'sending'",
    "CREATE INDEX IF NOT EXISTS jobs_batched ON jobs (response_id, status, created) "
    "WHERE instr(response_id, '#') > 0",
)
TALLIES = "SELECT resubmits, input, output, leased FROM job_tallies WHERE id = 0"
STATE_COUNTS = "SELECT state, status, n FROM job_counts WHERE n <> 0"
UNFINISHED_COUNTED = ("SELECT COALESCE(sum(n), 0) FROM job_counts "
                      "WHERE state IN ('new', 'sending', 'live')")
LIVE_ROWS = "SELECT key, response_id, status, created FROM jobs WHERE state = 'live' ORDER BY seq"
LIVE_RECORDS = f"SELECT {_COLUMNS} FROM jobs WHERE state = 'live' ORDER BY seq"
#: The keys being sent, each with its lease (NULL: nobody holds it).
SENDING_KEYS = "SELECT key, lease_until FROM jobs WHERE state = 'sending' ORDER BY seq"
#: The jobs of remote batches (``<batch_id>#<custom_id>``, see _providers/_kinds.py) by batch
#: and status, from the covering index jobs_batched: the batch id is what precedes the last #.
BATCH_GROUPS = """
    SELECT substr(response_id, 1, length(rtrim(response_id, replace(response_id, '#', ''))) - 1),
           status, count(*), min(created)
    FROM jobs WHERE instr(response_id, '#') > 0 AND substr(response_id, -1) <> '#'
    GROUP BY 1, 2
"""
