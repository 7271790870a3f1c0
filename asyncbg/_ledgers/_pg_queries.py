"""Every SQL statement of :class:`PostgresLedger`, to be reviewed together.

Tables, in the first schema of the connection's ``search_path`` (usually ``public``; pass
``?options=-csearch_path%3Dmyschema`` in the URL for another): ``asyncbg_meta`` (the schema
version), ``asyncbg_jobs`` (one row per key) and ``asyncbg_workers`` (who renewed lately).
Times are seconds since the epoch on the *database's* clock, so that machines whose clocks
disagree still agree on when a lease runs out.

Schema history (``asyncbg_meta.schema_version``):

- version 1: the tables below.
- version 2: ``asyncbg_outbox``, the webhook notifications (see :mod:`._outbox`), each written by
  the statement that records the outcome it announces, deleted once a receiver answered 2xx.

Creation and upgrades run in one transaction under ``pg_advisory_xact_lock``, so that workers
starting together neither race nor see a half-made schema.
"""

from __future__ import annotations

# No __all__: the module is a namespace, imported as `q` by _postgres.py.

SCHEMA_VERSION = 2
#: The key of the transaction-level advisory lock held while the schema is made or upgraded
#: ("abgj" and 1), and of the session-level lock an ``exclusive=True`` ledger holds ("abgj", 2).
SCHEMA_LOCK = 0x6162676A_00000001
EXCLUSIVE_LOCK = 0x6162676A_00000002

#: ``now()`` is the transaction's start: in autocommit, the statement's.
_NOW = "extract(epoch FROM now())::float8"

# A scan of the catalog (an MVCC snapshot), not to_regclass(): under the schema lock, a backend
# that looked before another one made the tables may still have "not there" in its catalog cache.
READ_VERSION = """
    SELECT bool_or(tablename = 'asyncbg_meta'), bool_or(tablename = 'asyncbg_jobs')
    FROM pg_catalog.pg_tables
    WHERE schemaname = current_schema() AND tablename IN ('asyncbg_meta', 'asyncbg_jobs')
"""
READ_SCHEMA_VERSION = "SELECT value FROM asyncbg_meta WHERE name = 'schema_version'"
LOCK_SCHEMA = "SELECT pg_advisory_xact_lock(%s)"
TRY_EXCLUSIVE = "SELECT pg_try_advisory_lock(%s)"

CREATE_V1 = (
    """
    CREATE TABLE asyncbg_meta (
        name  text PRIMARY KEY,
        value text NOT NULL
    )
    """,
    """
    CREATE TABLE asyncbg_jobs (
        key         text PRIMARY KEY,
        seq         bigint GENERATED ALWAYS AS IDENTITY,  -- claim order
        digest      text NOT NULL,
        request     bytea NOT NULL,
        state       text NOT NULL,      -- new | sending | live | done | local
        response_id text,
        status      text NOT NULL,
        body        bytea,              -- the final Response JSON, as the server sent it
        error       text,
        error_code  text,
        http_status integer,
        request_id  text,
        resubmits   integer NOT NULL DEFAULT 0,
        created     double precision NOT NULL,
        updated     double precision NOT NULL,
        owner       text,               -- the lease holder (SharedLedger.owner)
        epoch       bigint NOT NULL DEFAULT 0,  -- bumped by every takeover
        lease_until double precision    -- NULL: nobody holds it
    )
    """,
    "CREATE UNIQUE INDEX asyncbg_jobs_seq ON asyncbg_jobs (seq)",
    # What acquire scans: only unfinished rows, in claim order.
    """
    CREATE INDEX asyncbg_jobs_open ON asyncbg_jobs (seq)
        WHERE state IN ('new', 'sending', 'live')
    """,
    """
    CREATE TABLE asyncbg_workers (
        owner   text PRIMARY KEY,
        host    text NOT NULL,
        pid     integer NOT NULL,
        started double precision NOT NULL,
        seen    double precision NOT NULL,
        lease   double precision NOT NULL
    )
    """,
)
#: Each entry upgrades the schema from version ``n`` to ``n + 1``.
UPGRADES: dict[int, tuple[str, ...]] = {
    1: (
        """
        CREATE TABLE asyncbg_outbox (
            id          text PRIMARY KEY,   -- the webhook-id
            key         text NOT NULL,
            url         text NOT NULL,
            body        bytea NOT NULL,     -- posted and signed as it is, on every attempt
            state       text NOT NULL DEFAULT 'pending',  -- pending | failed
            attempts    integer NOT NULL DEFAULT 0,
            created     double precision NOT NULL,
            next_at     double precision NOT NULL,  -- due time of the next attempt
            owner       text,               -- the sender posting it now, until lease_until
            lease_until double precision,
            error       text,               -- why the last attempt failed
            http_status integer
        )
        """,
        "CREATE INDEX asyncbg_outbox_pending ON asyncbg_outbox (url, next_at) "
        "WHERE state = 'pending'",
    ),
}
WRITE_SCHEMA_VERSION = """
    INSERT INTO asyncbg_meta (name, value) VALUES ('schema_version', %s)
    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value
"""

_COLUMNS = (
    "key, digest, request, state, response_id, status, body, error, error_code, "
    "http_status, request_id, resubmits, created, updated"
)
_J_COLUMNS = ", ".join(f"j.{name.strip()}" for name in _COLUMNS.split(","))
GET = f"SELECT {_COLUMNS} FROM asyncbg_jobs WHERE key = %s"
RECORDS = f"SELECT {_COLUMNS} FROM asyncbg_jobs ORDER BY seq"
RESUBMITS = "SELECT COALESCE(sum(resubmits), 0) FROM asyncbg_jobs"
UNFINISHED = "SELECT count(*) FROM asyncbg_jobs WHERE state IN ('new', 'sending', 'live')"

# -- claims -------------------------------------------------------------------------------------

# Params: key, digest, request, owner, lease.
CLAIM_INSERT = f"""
    INSERT INTO asyncbg_jobs (key, digest, request, state, status, created, updated, owner,
                              epoch, lease_until)
    VALUES (%s, %s, %s, 'new', 'pending', {_NOW}, {_NOW}, %s, 1, {_NOW} + %s)
    ON CONFLICT (key) DO NOTHING
    RETURNING {_COLUMNS}, epoch
"""
# Params: owner, key. `elsewhere`: another live owner holds it. CLAIM_READ decides outcomes
# that change nothing (DONE, MISMATCH, FOLLOW) without a transaction; CLAIM_LOCK, inside one,
# decides again before a write.
_CLAIM_SELECT = f"""
    SELECT {_COLUMNS},
           owner IS NOT NULL AND owner <> %s AND lease_until > {_NOW} AS elsewhere
    FROM asyncbg_jobs WHERE key = %s
"""
CLAIM_READ = _CLAIM_SELECT
CLAIM_LOCK = _CLAIM_SELECT + " FOR UPDATE"
# Each takes the lease (owner, lease) and bumps the epoch; then the claim rules' own changes.
_TAKE = f"owner = %(owner)s, epoch = epoch + 1, lease_until = {_NOW} + %(lease)s"
CLAIM_RESET = f"""
    UPDATE asyncbg_jobs SET digest = %(digest)s, request = %(request)s, state = 'new',
        response_id = NULL, status = 'pending', body = NULL, error = NULL, error_code = NULL,
        http_status = NULL, request_id = NULL, updated = {_NOW}, {_TAKE}
    WHERE key = %(key)s RETURNING {_COLUMNS}, epoch
"""
CLAIM_RESEND = f"""
    UPDATE asyncbg_jobs SET request = %(request)s, status = 'pending', updated = {_NOW}, {_TAKE}
    WHERE key = %(key)s RETURNING {_COLUMNS}, epoch
"""
CLAIM_RESUME = f"""
    UPDATE asyncbg_jobs SET {_TAKE}
    WHERE key = %(key)s RETURNING {_COLUMNS}, epoch
"""

# -- writes, fenced by owner and epoch -------------------------------------------------------------

# Params: resubmit (0/1), key, owner, epoch.
SENDING = f"""
    UPDATE asyncbg_jobs SET state = 'sending', response_id = NULL, status = 'pending',
        resubmits = resubmits + %s, updated = {_NOW}
    WHERE key = %s AND owner = %s AND epoch = %s
"""
# Params: response_id, status, key, owner, epoch.
RECORD_LIVE = f"""
    UPDATE asyncbg_jobs SET state = 'live', response_id = COALESCE(%s, response_id),
        status = %s, updated = {_NOW}
    WHERE key = %s AND owner = %s AND epoch = %s
"""
# Params: state, response_id, status, body, error, error_code, http_status, request_id,
# key, owner, epoch. A finished key needs no lease any more.
RECORD_TERMINAL = f"""
    UPDATE asyncbg_jobs SET state = %s, response_id = COALESCE(%s, response_id), status = %s,
        body = %s, error = %s, error_code = %s, http_status = %s, request_id = %s,
        updated = {_NOW}, lease_until = NULL
    WHERE key = %s AND owner = %s AND epoch = %s
"""
# Params: id, url, body (the notification), then RECORD_TERMINAL's. One statement, so one
# transaction: the outcome and its notification are written together or not at all. It returns
# the key when the fenced update matched.
RECORD_TERMINAL_NOTIFY = f"""
    WITH notice AS (SELECT %s::text AS id, %s::text AS url, %s::bytea AS body),
    done AS (
        UPDATE asyncbg_jobs SET state = %s, response_id = COALESCE(%s, response_id),
            status = %s, body = %s, error = %s, error_code = %s, http_status = %s,
            request_id = %s, updated = {_NOW}, lease_until = NULL
        WHERE key = %s AND owner = %s AND epoch = %s
        RETURNING key
    ),
    added AS (
        INSERT INTO asyncbg_outbox (id, key, url, body, created, next_at)
        SELECT notice.id, done.key, notice.url, notice.body, {_NOW}, {_NOW} FROM notice, done
        ON CONFLICT (id) DO NOTHING
    )
    SELECT key FROM done
"""
#: Why a fenced write changed nothing: the key is missing (a bug) or its lease is elsewhere.
EXISTS = "SELECT 1 FROM asyncbg_jobs WHERE key = %s"

# -- the fleet -------------------------------------------------------------------------------------

# Params: keys, digests, requests (arrays). Waiting jobs: no owner.
ENQUEUE = f"""
    INSERT INTO asyncbg_jobs (key, digest, request, state, status, created, updated)
    SELECT i.key, i.digest, i.request, 'new', 'pending', {_NOW}, {_NOW}
    FROM unnest(%s::text[], %s::text[], %s::bytea[]) WITH ORDINALITY AS i(key, digest, request, n)
    ORDER BY i.n
    ON CONFLICT (key) DO NOTHING
"""
# Params: keys, digests. The first key already there with another request.
ENQUEUE_MISMATCH = """
    SELECT j.key FROM asyncbg_jobs j
    JOIN unnest(%s::text[], %s::text[]) WITH ORDINALITY AS i(key, digest, n) ON j.key = i.key
    WHERE j.digest <> i.digest ORDER BY i.n LIMIT 1
"""
# Params: limit, owner, lease, live_only. Rows another acquire is taking right now are skipped,
# not waited for; the UPDATE sees each row as it is once locked.
ACQUIRE = f"""
    WITH picked AS (
        SELECT key FROM asyncbg_jobs
        WHERE state IN ('new', 'sending', 'live') AND (NOT %(live_only)s OR state = 'live')
          AND (lease_until IS NULL OR lease_until <= {_NOW})
        ORDER BY seq
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    UPDATE asyncbg_jobs j
    SET owner = %(owner)s, epoch = j.epoch + 1, lease_until = {_NOW} + %(lease)s
    FROM picked WHERE j.key = picked.key
    RETURNING {_J_COLUMNS}, j.epoch, j.seq
"""
# One round trip for the heartbeat and every renewal. Rows taken over since (another owner, or
# another epoch) or finished are not returned: their leases are lost.
RENEW = f"""
    WITH alive AS (
        INSERT INTO asyncbg_workers (owner, host, pid, started, seen, lease)
        VALUES (%(owner)s, %(host)s, %(pid)s, {_NOW}, {_NOW}, %(lease)s)
        ON CONFLICT (owner) DO UPDATE SET seen = EXCLUDED.seen, lease = EXCLUDED.lease
    )
    UPDATE asyncbg_jobs j SET lease_until = {_NOW} + %(lease)s
    FROM unnest(%(keys)s::text[], %(epochs)s::bigint[]) AS h(key, epoch)
    WHERE j.key = h.key AND j.epoch = h.epoch AND j.owner = %(owner)s
      AND j.state IN ('new', 'sending', 'live')
    RETURNING j.key
"""
# The epoch stays: the next taker bumps it.
RELEASE = """
    UPDATE asyncbg_jobs j SET owner = NULL, lease_until = NULL
    FROM unnest(%(keys)s::text[], %(epochs)s::bigint[]) AS h(key, epoch)
    WHERE j.key = h.key AND j.epoch = h.epoch AND j.owner = %(owner)s
"""
# Back to waiting: only what this owner ended locally (nothing was paid for).
REQUEUE = f"""
    UPDATE asyncbg_jobs SET state = 'new', response_id = NULL, status = 'pending', body = NULL,
        error = NULL, error_code = NULL, http_status = NULL, request_id = NULL, owner = NULL,
        lease_until = NULL, updated = {_NOW}
    WHERE key = ANY(%(keys)s::text[]) AND owner = %(owner)s AND state = 'local'
"""
# An operator's retry: whoever ended them; never a key with a response id (paid for).
REQUEUE_UNPAID = f"""
    UPDATE asyncbg_jobs SET state = 'new', status = 'pending', body = NULL, error = NULL,
        error_code = NULL, http_status = NULL, request_id = NULL, owner = NULL,
        lease_until = NULL, updated = {_NOW}
    WHERE state = 'local' AND response_id IS NULL
      AND (%(code)s::text IS NULL OR error_code = %(code)s::text)
"""
WORKERS = f"""
    SELECT w.owner, w.host, w.pid, w.started, w.seen, w.lease,
           (SELECT count(*) FROM asyncbg_jobs j
            WHERE j.owner = w.owner AND j.lease_until > {_NOW}
              AND j.state IN ('new', 'sending', 'live'))
    FROM asyncbg_workers w
    WHERE w.seen + w.lease > {_NOW}
    ORDER BY w.started, w.owner
"""
FORGET_WORKER = "DELETE FROM asyncbg_workers WHERE owner = %s"
#: Rows of workers not seen for a day: tidiness, on open.
FORGET_OLD_WORKERS = f"DELETE FROM asyncbg_workers WHERE seen < {_NOW} - 86400"

# -- the outbox (version 2; see _pg_outbox.py) ----------------------------------------------------

_DELIVERY = f"o.id, o.key, o.url, o.body, o.state, o.attempts, {_NOW} - o.created, o.error, " \
    "o.http_status"
_URL = "(%(url)s::text IS NULL OR o.url = %(url)s)"
# Params: done, url, limit, owner, lease. Deletes ``done`` (answered 2xx) and takes more, in
# one statement. Rows another sender is taking right now are skipped. One endpoint's (the
# sender's case: the url is spelled out, so that even a generic plan walks the index in due
# order) or any endpoint's (``asyncbg notify``).
_TAKE = f"""
    WITH gone AS (DELETE FROM asyncbg_outbox WHERE id = ANY(%(done)s::text[])),
    picked AS (
        SELECT o.id FROM asyncbg_outbox o
        WHERE o.state = 'pending' AND {{url}} AND o.next_at <= {_NOW}
          AND (o.lease_until IS NULL OR o.lease_until <= {_NOW})
        ORDER BY o.next_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    UPDATE asyncbg_outbox o SET owner = %(owner)s, lease_until = {_NOW} + %(lease)s
    FROM picked WHERE o.id = picked.id
    RETURNING {_DELIVERY}, o.next_at
"""
OUTBOX_TAKE = _TAKE.format(url="o.url = %(url)s")
OUTBOX_TAKE_ANY = _TAKE.format(url="%(url)s::text IS NULL")
# Params: ids.
OUTBOX_DONE = "DELETE FROM asyncbg_outbox WHERE id = ANY(%s::text[])"
# Params: ids, owner.
OUTBOX_RELEASE = """
    UPDATE asyncbg_outbox SET owner = NULL, lease_until = NULL
    WHERE id = ANY(%s::text[]) AND owner = %s
"""
# Params: state, retry_in, error, http_status, id, owner.
OUTBOX_FAILED = f"""
    UPDATE asyncbg_outbox SET state = %(state)s, next_at = {_NOW} + %(retry_in)s,
        error = %(error)s, http_status = %(http_status)s, attempts = attempts + 1,
        owner = NULL, lease_until = NULL
    WHERE id = %(id)s AND owner = %(owner)s AND state = 'pending'
"""
# Params: url.
OUTBOX_DELIVER_NOW = f"""
    UPDATE asyncbg_outbox SET next_at = {_NOW}
    WHERE state = 'pending' AND url = %(url)s AND next_at > {_NOW}
      AND (lease_until IS NULL OR lease_until <= {_NOW})
"""
# Params: error, url, older_than (NULL: all).
OUTBOX_FAIL_ALL = f"""
    UPDATE asyncbg_outbox SET state = 'failed', error = %(error)s
    WHERE state = 'pending' AND url = %(url)s
      AND (%(older_than)s::float8 IS NULL OR created < {_NOW} - %(older_than)s::float8)
"""
# Params: url (NULL: any).
OUTBOX_RETRY_FAILED = f"""
    UPDATE asyncbg_outbox o SET state = 'pending', created = {_NOW}, next_at = {_NOW},
        owner = NULL, lease_until = NULL
    WHERE o.state = 'failed' AND {_URL}
"""
# Params: url, held (count leased ones too).
_NEXT = f"""
    SELECT min(greatest(o.next_at, COALESCE(o.lease_until, 0))) - {_NOW} FROM asyncbg_outbox o
    WHERE o.state = 'pending' AND {{url}}
      AND (%(held)s OR o.lease_until IS NULL OR o.lease_until <= {_NOW})
"""
OUTBOX_NEXT = _NEXT.format(url="o.url = %(url)s")
OUTBOX_NEXT_ANY = _NEXT.format(url="%(url)s::text IS NULL")
OUTBOX_ALL = f"SELECT {_DELIVERY} FROM asyncbg_outbox o ORDER BY o.created, o.id"
