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
- version 3: claims and counts independent of the ledger's size. Two partial indexes in place of
  ``asyncbg_jobs_open``: waiting rows (no lease) in claim order, and leased rows by the time
  their lease runs out, so that a claim reads only rows it can take however many are leased;
  and ``asyncbg_counts``, the number of jobs per state and status, kept by triggers (inserts
  and deletes: one upsert per statement; updates: only those that change a state or status),
  spread over 64 slots by backend so that workers do not queue on one row, so that ``status``
  and ``unfinished()`` read a few dozen rows, not every job.
- version 4: ``sent_epoch``, the epoch a ``sending`` record was written at. A takeover of a key
  whose lease ran out while its holder's create was in flight (``sent_epoch = epoch``) waits one
  more safety margin (:func:`~._shared.safety_margin`) before it takes the key: a create that
  left just before the lease ran out has had its answer recorded by then (the old holder's
  writes still match owner and epoch), or it is known lost.
- version 5: what ``asyncbg status`` reads at any size (:mod:`._overview`): ``asyncbg_tallies``
  (possible duplicates and the tokens of the final bodies, by slot as ``asyncbg_counts``), kept
  by triggers (inserts and deletes: one upsert per statement, from the rows with a body or a
  resubmit; updates: only those that change either), and partial indexes on live, sending and
  batched rows (the rows ``status`` lists).
- version 6: the counters and the tallies kept per statement for updates too: triggers with
  transition tables in place of the per-row ones, so that a statement writing hundreds of
  jobs' states (the grouped writes) makes one upsert per (state, status) it changed and one of
  the tallies, not two or three per row.
- version 7: ``input_tokens`` and ``output_tokens``, a final body's tokens written with it by
  the worker (:func:`~._overview.body_tokens`), so that the tallies' triggers add columns and
  the server, which every worker of a fleet shares, parses no body (each parse was a PL/pgSQL
  call and a subtransaction). NULL (rows written before, a count that does not fit): the body
  is parsed, as before. The tallies are sums over the statement's rows after, less before, not
  a join of the two.
- version 8: HOT middle writes. ``waiting`` (the state of an unfinished row nobody holds),
  ``leased`` (the lease of an unfinished row), ``batch_id`` and ``batch_status`` (a remote
  batch's jobs), stored generated columns, and the partial indexes of versions 3 and 5 made on
  them in place of the state, the lease and the response id: a job's ``sending`` and
  response-id writes change no indexed column, so PostgreSQL writes them as HOT updates (the
  new version on the same page, no index entries; ``fillfactor`` 70 leaves room for them), where
  each was a new version with an entry in every index. The live and sending rows ``status``
  lists are read from the released rows' index and the lease index (the state is no longer in
  any index). The tallies' functions fence their parse with ``OFFSET 0``: in version 7 the
  planner pulled the subquery into the join and parsed every final body all the same, columns
  or not. The upgrade rewrites the table (the generated columns are computed for every row:
  seconds at a million jobs) under its exclusive lock. A worker of version 7 still running
  after it keeps working (every statement of its is valid), but its claims find none of the
  indexes they were planned for and read the table in claim order: restart the fleet's
  workers with this version; a version-7 process that opens the ledger afterwards is refused
  (schema too new).

Creation and upgrades run in one transaction under ``pg_advisory_xact_lock``, so that workers
starting together neither race nor see a half-made schema.
"""

from __future__ import annotations

# No __all__: the module is a namespace, imported as `q` by _postgres.py.
import functools

SCHEMA_VERSION = 8
#: The key of the transaction-level advisory lock held while the schema is made or upgraded
#: ("abgj" and 1), and of the session-level lock an ``exclusive=True`` ledger holds ("abgj", 2).
SCHEMA_LOCK = 0x6162676A_00000001
EXCLUSIVE_LOCK = 0x6162676A_00000002

#: ``now()`` is the transaction's start: in autocommit, the statement's.
_NOW = "extract(epoch FROM now())::float8"

# A scan of the catalog (an MVCC snapshot), not to_regclass(): under the schema lock, a backend
# that looked before another one made the tables may still have "not there" in its catalog cache.
#: With the database and schema: the ledger's identity, where a worker keeps what it could
#: not record (see _rescue.py).
READ_VERSION = """
    SELECT bool_or(tablename = 'asyncbg_meta'), bool_or(tablename = 'asyncbg_jobs')
    FROM pg_catalog.pg_tables
    WHERE schemaname = current_schema() AND tablename IN ('asyncbg_meta', 'asyncbg_jobs')
"""
#: What names a ledger's rescue file (see PostgresLedger._read_identity): the server's system
#: identifier (the same on a standby and after a restart), the database's OID and the schema.
IDENTITY = """
    SELECT (SELECT system_identifier FROM pg_control_system()), d.oid, current_schema()
    FROM pg_database d WHERE d.datname = current_database()
"""
#: When pg_control_system() is not this user's to call: the server's address and port as it
#: sees the connection (NULL over a Unix socket), the database and the schema.
DATABASE_AND_SCHEMA = """
    SELECT host(inet_server_addr()), inet_server_port(), current_database(), current_schema()
"""
READ_SCHEMA_VERSION = "SELECT value FROM asyncbg_meta WHERE name = 'schema_version'"
LOCK_SCHEMA = "SELECT pg_advisory_xact_lock(%s)"
#: Params: statement timeout, idle-in-transaction timeout (milliseconds, as text). Run on every
#: new connection (autocommit: they last the session).
SET_TIMEOUTS = """
    SELECT set_config('statement_timeout', %s, false),
           set_config('idle_in_transaction_session_timeout', %s, false)
"""
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
# One row's part of the tallies (schema 7): its resubmits and its body's tokens, from the
# columns written with the body, or (NULL: written before them) by parsing it; rows without
# either are left out. Format: rows (a transition table), sign ("" or "-"), fence (_FENCE, or
# "" as schemas 6 and 7 had it).
_ROW_TALLY = """
    SELECT {sign}r.resubmits AS r,
           {sign}CASE WHEN r.body IS NULL THEN 0 WHEN k.i IS NULL THEN r.input_tokens
                      ELSE k.i END AS i,
           {sign}CASE WHEN r.body IS NULL THEN 0 WHEN k.i IS NULL THEN r.output_tokens
                      ELSE k.o END AS o
    FROM {rows} r LEFT JOIN LATERAL (
        SELECT t.i, t.o FROM asyncbg_tokens(r.body) t
        WHERE r.input_tokens IS NULL OR r.output_tokens IS NULL{fence}) AS k ON true
    WHERE r.resubmits <> 0 OR r.body IS NOT NULL
"""
# Adds the sums of ``rows`` (parts as _ROW_TALLY makes them) to this backend's slot of the
# tallies, unless they are all zero.
_ADD_TALLIES = """
    INSERT INTO asyncbg_tallies AS c (slot, resubmits, input, output)
    SELECT pg_backend_pid() % 64, sum(m.r), sum(m.i), sum(m.o) FROM ({rows}) AS m
    HAVING sum(m.r) <> 0 OR sum(m.i) <> 0 OR sum(m.o) <> 0
    ON CONFLICT (slot) DO UPDATE SET resubmits = c.resubmits + EXCLUDED.resubmits,
        input = c.input + EXCLUDED.input, output = c.output + EXCLUDED.output
"""


def _tally_functions(fence: str) -> tuple[str, str]:
    """The tally triggers' two functions: ``asyncbg_tally_rows`` (inserts and deletes: the
    rows' sums) and ``asyncbg_tally_moves`` (updates: the rows' sums after, less before: rows
    a statement left as they were add and take away the same, and a row without a body or a
    resubmit is not read at all, so no join of the two is needed). ``fence``: see _FENCE."""
    def tally(rows: str, sign: str) -> str:
        return _ROW_TALLY.format(rows=rows, sign=sign, fence=fence)

    return (
        f"""
        CREATE OR REPLACE FUNCTION asyncbg_tally_rows() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                {_ADD_TALLIES.format(rows=tally("new_rows", ""))};
            ELSE
                {_ADD_TALLIES.format(rows=tally("old_rows", "-"))};
            END IF;
            RETURN NULL;
        END $$
        """,
        f"""
        CREATE OR REPLACE FUNCTION asyncbg_tally_moves() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            {_ADD_TALLIES.format(rows=tally("new_rows", "") + " UNION ALL "
                                 + tally("old_rows", "-"))};
            RETURN NULL;
        END $$
        """,
    )


# Schema 8: OFFSET 0 keeps _ROW_TALLY's lateral subquery a plan of its own, in which the test
# of the row's columns is a one-time filter ahead of the function call. Without it (schema 7)
# the subquery is pulled up into the join, the function scan runs for every row and the test
# throws its result away afterwards: every final body was parsed in PL/pgSQL (about 23 us a
# row, EXPLAIN ANALYZE over 50 rows: 1.2 ms against 0.05 ms).
_FENCE = " OFFSET 0"

# The generated columns of schema 8, which every index but the key's and seq's is made on
# instead of the columns they are computed from: each changes only when a job is claimed,
# renewed, released or ended, so that the holder's writes in between (``sending``; the response
# id and status) change no indexed column and are HOT updates (a row version on the same page,
# no index entry), where each was a new version with an entry in every index.
#: The state of an unfinished job that nobody holds; NULL for the held and the finished.
_WAITING = ("CASE WHEN lease_until IS NULL AND state IN ('new', 'sending', 'live') "
            "THEN state END")
#: The lease of an unfinished job; NULL for the waiting and the finished.
_LEASED = "CASE WHEN state IN ('new', 'sending', 'live') THEN lease_until END"
#: A remote batch's job (a response id ``BATCH#CUSTOM_ID``): the batch, and the job's status.
_BATCHED = "strpos(response_id, '#') > 0 AND right(response_id, 1) <> '#'"
_BATCH_ID = f"CASE WHEN {_BATCHED} THEN regexp_replace(response_id, '#[^#]*$', '') END"
_BATCH_STATUS = f"CASE WHEN {_BATCHED} THEN status END"

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
    2: (
        # No writer between the count below and the triggers that keep it (an older asyncbg
        # still running); CREATE TRIGGER would take this lock anyway.
        "LOCK TABLE asyncbg_jobs IN SHARE ROW EXCLUSIVE MODE",
        "DROP INDEX IF EXISTS asyncbg_jobs_open",
        # What a claim reads: waiting rows in claim order (released live ones have their own,
        # for a full worker that adopts only those), and leases by when they run out.
        "CREATE INDEX asyncbg_jobs_waiting ON asyncbg_jobs (seq) "
        "WHERE lease_until IS NULL AND state IN ('new', 'sending', 'live')",
        "CREATE INDEX asyncbg_jobs_waiting_live ON asyncbg_jobs (seq) "
        "WHERE lease_until IS NULL AND state = 'live'",
        "CREATE INDEX asyncbg_jobs_leased ON asyncbg_jobs (lease_until) "
        "WHERE lease_until IS NOT NULL AND state IN ('new', 'sending', 'live')",
        """
        CREATE TABLE asyncbg_counts (
            slot   integer NOT NULL,   -- pg_backend_pid() % 64: writers rarely share a row
            state  text NOT NULL,
            status text NOT NULL,
            n      bigint NOT NULL,
            PRIMARY KEY (slot, state, status)
        )
        """,
        # Inserts and deletes: one upsert per statement and (state, status), from its
        # transition table (an enqueue of a million lines is one), in sorted order (two
        # statements never lock counters in opposite orders).
        """
        CREATE FUNCTION asyncbg_count_rows() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO asyncbg_counts AS c (slot, state, status, n)
                SELECT pg_backend_pid() % 64, state, status, count(*) FROM new_rows
                GROUP BY state, status ORDER BY state, status
                ON CONFLICT (slot, state, status) DO UPDATE SET n = c.n + EXCLUDED.n;
            ELSE
                INSERT INTO asyncbg_counts AS c (slot, state, status, n)
                SELECT pg_backend_pid() % 64, state, status, -count(*) FROM old_rows
                GROUP BY state, status ORDER BY state, status
                ON CONFLICT (slot, state, status) DO UPDATE SET n = c.n + EXCLUDED.n;
            END IF;
            RETURN NULL;
        END $$
        """,
        # Updates: per row, and only for those that change the state or the status (the
        # WHEN is checked without calling the function): claims, renewals and releases,
        # which change neither, cost nothing.
        """
        CREATE FUNCTION asyncbg_count_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO asyncbg_counts AS c (slot, state, status, n)
            SELECT pg_backend_pid() % 64, v.state, v.status, v.n
            FROM (VALUES (OLD.state, OLD.status, -1), (NEW.state, NEW.status, 1))
                AS v(state, status, n)
            ORDER BY v.state, v.status
            ON CONFLICT (slot, state, status) DO UPDATE SET n = c.n + EXCLUDED.n;
            RETURN NULL;
        END $$
        """,
        "CREATE TRIGGER asyncbg_count_insert AFTER INSERT ON asyncbg_jobs "
        "REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION asyncbg_count_rows()",
        "CREATE TRIGGER asyncbg_count_delete AFTER DELETE ON asyncbg_jobs "
        "REFERENCING OLD TABLE AS old_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION asyncbg_count_rows()",
        "CREATE TRIGGER asyncbg_count_update AFTER UPDATE OF state, status ON asyncbg_jobs "
        "FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state "
        "OR OLD.status IS DISTINCT FROM NEW.status) "
        "EXECUTE FUNCTION asyncbg_count_change()",
        "INSERT INTO asyncbg_counts (slot, state, status, n) "
        "SELECT 0, state, status, count(*) FROM asyncbg_jobs GROUP BY state, status",
    ),
    3: ("ALTER TABLE asyncbg_jobs ADD COLUMN sent_epoch bigint",),
    4: (
        # As for asyncbg_counts: no writer between the sums below and the triggers that keep
        # them.
        "LOCK TABLE asyncbg_jobs IN SHARE ROW EXCLUSIVE MODE",
        """
        CREATE FUNCTION asyncbg_token_count(v json) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
            SELECT CASE WHEN json_typeof(v) = 'number' THEN trunc((v #>> '{}')::numeric)::bigint
                        ELSE 0 END
        $$
        """,
        # The tokens of a final body, as asyncbg._ledgers._overview.body_tokens counts them
        # (the first truthy of usage, usageMetadata, usage_metadata; OpenAI's, Anthropic's,
        # Gemini's or Chat Completions' usage): zeros when it is not UTF-8 JSON (or a count
        # does not fit), never an error (a write is never refused for its body). PL/pgSQL, not
        # a SQL function with subqueries: that one is set up again at every call (20 ms a
        # body from a trigger, where this takes about 50 us).
        """
        CREATE FUNCTION asyncbg_tokens(body bytea, OUT i bigint, OUT o bigint)
        LANGUAGE plpgsql IMMUTABLE AS $$
        DECLARE
            b json;
            u json;
            v json;
            t text;
            name text;
        BEGIN
            i := 0;
            o := 0;
            IF body IS NULL THEN
                RETURN;
            END IF;
            BEGIN
                -- \\u0000 is valid JSON that PostgreSQL's JSON functions refuse; as \\u0001 the
                -- text stays valid JSON (only a string's character changes), and counts alike.
                b := replace(convert_from(body, 'UTF8'), '\\u0000', '\\u0001')::json;
                IF json_typeof(b) <> 'object' THEN
                    RETURN;
                END IF;
                FOREACH name IN ARRAY ARRAY['usage', 'usageMetadata', 'usage_metadata'] LOOP
                    v := b -> name;
                    t := json_typeof(v);
                    IF t = 'object' AND EXISTS (SELECT FROM json_object_keys(v))
                       OR t = 'array' AND json_array_length(v) > 0
                       OR t = 'string' AND v #>> '{}' <> ''
                       OR t = 'number' AND (v #>> '{}')::numeric <> 0
                       OR t = 'boolean' AND v #>> '{}' = 'true' THEN
                        u := v;
                        EXIT;
                    END IF;
                END LOOP;
                IF u IS NULL OR json_typeof(u) <> 'object' THEN
                    RETURN;
                END IF;
                IF u -> 'input_tokens' IS NULL AND u -> 'usageMetadata' IS NOT NULL THEN
                    u := u -> 'usageMetadata';
                    IF json_typeof(u) <> 'object' THEN
                        RETURN;
                    END IF;
                END IF;
                IF u -> 'input_tokens' IS NOT NULL THEN
                    i := asyncbg_token_count(u -> 'input_tokens');
                    o := asyncbg_token_count(u -> 'output_tokens');
                    IF coalesce(json_typeof(u -> 'cache_read_input_tokens'), 'null') <> 'null'
                       OR coalesce(json_typeof(u -> 'cache_creation_input_tokens'), 'null')
                          <> 'null' THEN
                        i := i + asyncbg_token_count(u -> 'cache_read_input_tokens')
                               + asyncbg_token_count(u -> 'cache_creation_input_tokens');
                    END IF;
                ELSIF u -> 'promptTokenCount' IS NOT NULL
                      OR u -> 'candidatesTokenCount' IS NOT NULL THEN
                    i := asyncbg_token_count(u -> 'promptTokenCount');
                    o := asyncbg_token_count(u -> 'candidatesTokenCount')
                         + asyncbg_token_count(u -> 'thoughtsTokenCount');
                ELSIF u -> 'prompt_tokens' IS NOT NULL THEN
                    i := asyncbg_token_count(u -> 'prompt_tokens');
                    o := asyncbg_token_count(u -> 'completion_tokens');
                END IF;
            EXCEPTION WHEN others THEN  -- not JSON, not UTF-8, a count past bigint: nothing
                i := 0;
                o := 0;
            END;
        END $$
        """,
        # Spread over slots by backend, as asyncbg_counts.
        """
        CREATE TABLE asyncbg_tallies (
            slot      integer PRIMARY KEY,
            resubmits bigint NOT NULL,
            input     bigint NOT NULL,
            output    bigint NOT NULL
        )
        """,
        # Inserts and deletes: one upsert per statement, from the rows that change a sum (an
        # enqueue's rows have no body and no resubmit: nothing is upserted).
        """
        CREATE FUNCTION asyncbg_tally_rows() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO asyncbg_tallies AS c (slot, resubmits, input, output)
                SELECT pg_backend_pid() % 64, sum(r.resubmits), sum(k.i), sum(k.o)
                FROM new_rows r, LATERAL asyncbg_tokens(r.body) k
                WHERE r.resubmits <> 0 OR r.body IS NOT NULL HAVING count(*) > 0
                ON CONFLICT (slot) DO UPDATE SET resubmits = c.resubmits + EXCLUDED.resubmits,
                    input = c.input + EXCLUDED.input, output = c.output + EXCLUDED.output;
            ELSE
                INSERT INTO asyncbg_tallies AS c (slot, resubmits, input, output)
                SELECT pg_backend_pid() % 64, -sum(r.resubmits), -sum(k.i), -sum(k.o)
                FROM old_rows r, LATERAL asyncbg_tokens(r.body) k
                WHERE r.resubmits <> 0 OR r.body IS NOT NULL HAVING count(*) > 0
                ON CONFLICT (slot) DO UPDATE SET resubmits = c.resubmits + EXCLUDED.resubmits,
                    input = c.input + EXCLUDED.input, output = c.output + EXCLUDED.output;
            END IF;
            RETURN NULL;
        END $$
        """,
        # Updates: per row, only those that change the resubmits or the body.
        """
        CREATE FUNCTION asyncbg_tally_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO asyncbg_tallies AS c (slot, resubmits, input, output)
            SELECT pg_backend_pid() % 64, NEW.resubmits - OLD.resubmits, n.i - p.i, n.o - p.o
            FROM asyncbg_tokens(NEW.body) n, asyncbg_tokens(OLD.body) p
            ON CONFLICT (slot) DO UPDATE SET resubmits = c.resubmits + EXCLUDED.resubmits,
                input = c.input + EXCLUDED.input, output = c.output + EXCLUDED.output;
            RETURN NULL;
        END $$
        """,
        "CREATE TRIGGER asyncbg_tally_insert AFTER INSERT ON asyncbg_jobs "
        "REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION asyncbg_tally_rows()",
        "CREATE TRIGGER asyncbg_tally_delete AFTER DELETE ON asyncbg_jobs "
        "REFERENCING OLD TABLE AS old_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION asyncbg_tally_rows()",
        "CREATE TRIGGER asyncbg_tally_update AFTER UPDATE OF resubmits, body ON asyncbg_jobs "
        "FOR EACH ROW WHEN (OLD.resubmits IS DISTINCT FROM NEW.resubmits "
        "OR OLD.body IS DISTINCT FROM NEW.body) "
        "EXECUTE FUNCTION asyncbg_tally_change()",
        # The sums so far (about a minute at a million jobs: see _UPGRADE_TIMEOUT).
        "INSERT INTO asyncbg_tallies (slot, resubmits, input, output) "
        "SELECT 0, COALESCE(sum(j.resubmits), 0), COALESCE(sum(k.i), 0), COALESCE(sum(k.o), 0) "
        "FROM asyncbg_jobs j, LATERAL asyncbg_tokens(j.body) k",
        # What status lists, each through an index of only those rows.
        "CREATE INDEX asyncbg_jobs_live ON asyncbg_jobs (seq) WHERE state = 'live'",
        "CREATE INDEX asyncbg_jobs_sending ON asyncbg_jobs (seq) WHERE state = 'sending'",
        "CREATE INDEX asyncbg_jobs_batched ON asyncbg_jobs (response_id, status, created) "
        "WHERE strpos(response_id, '#') > 0",
    ),
    5: (
        # The per-row trigger goes and the statement's comes in one transaction: DROP TRIGGER
        # locks the table against writers until the commit, so no update goes uncounted.
        "DROP TRIGGER asyncbg_count_update ON asyncbg_jobs",
        "DROP FUNCTION asyncbg_count_change()",
        # Every update statement (a trigger with transition tables cannot name columns):
        # what it moved, per (state, status), from its rows before and after, in sorted order;
        # those that moved nothing (claims, renewals, releases) upsert nothing.
        """
        CREATE FUNCTION asyncbg_count_moves() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO asyncbg_counts AS c (slot, state, status, n)
            SELECT pg_backend_pid() % 64, m.state, m.status, sum(m.n)
            FROM (SELECT state, status, 1 AS n FROM new_rows
                  UNION ALL SELECT state, status, -1 FROM old_rows) AS m
            GROUP BY m.state, m.status HAVING sum(m.n) <> 0 ORDER BY m.state, m.status
            ON CONFLICT (slot, state, status) DO UPDATE SET n = c.n + EXCLUDED.n;
            RETURN NULL;
        END $$
        """,
        "CREATE TRIGGER asyncbg_count_update AFTER UPDATE ON asyncbg_jobs "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION asyncbg_count_moves()",
        # The tallies likewise: one upsert per update statement, from the rows whose resubmits
        # or body it changed (a claim's, a renewal's: none; a terminal write's: its bodies,
        # each parsed once), in place of a function call and an upsert per such row.
        "DROP TRIGGER asyncbg_tally_update ON asyncbg_jobs",
        "DROP FUNCTION asyncbg_tally_change()",
        """
        CREATE FUNCTION asyncbg_tally_moves() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO asyncbg_tallies AS c (slot, resubmits, input, output)
            SELECT pg_backend_pid() % 64, sum(n.resubmits - o.resubmits), sum(nk.i - ok.i),
                   sum(nk.o - ok.o)
            FROM old_rows o JOIN new_rows n ON n.key = o.key,
                 LATERAL asyncbg_tokens(CASE WHEN n.body IS DISTINCT FROM o.body
                                             THEN n.body END) nk,
                 LATERAL asyncbg_tokens(CASE WHEN n.body IS DISTINCT FROM o.body
                                             THEN o.body END) ok
            WHERE n.resubmits IS DISTINCT FROM o.resubmits OR n.body IS DISTINCT FROM o.body
            HAVING count(*) > 0
            ON CONFLICT (slot) DO UPDATE SET resubmits = c.resubmits + EXCLUDED.resubmits,
                input = c.input + EXCLUDED.input, output = c.output + EXCLUDED.output;
            RETURN NULL;
        END $$
        """,
        "CREATE TRIGGER asyncbg_tally_update AFTER UPDATE ON asyncbg_jobs "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION asyncbg_tally_moves()",
    ),
    6: (
        # Both NULL until a writer of this version writes a body (no table rewrite).
        "ALTER TABLE asyncbg_jobs ADD COLUMN input_tokens bigint, "
        "ADD COLUMN output_tokens bigint",
        # Replaced in place: the triggers stay, and a statement runs the old functions or the
        # new ones, which agree on every row written before (NULL columns: the body parsed).
        *_tally_functions(""),
    ),
    7: (
        # Writes made while this runs wait for it (ALTER TABLE takes the table's exclusive
        # lock); the indexes that name the state or the response id go first, as the rewrite
        # below (a stored generated column is computed for every row) would rebuild them.
        "DROP INDEX asyncbg_jobs_waiting, asyncbg_jobs_waiting_live, asyncbg_jobs_leased, "
        "asyncbg_jobs_live, asyncbg_jobs_sending, asyncbg_jobs_batched",
        f"""
        ALTER TABLE asyncbg_jobs
            ADD COLUMN waiting text GENERATED ALWAYS AS ({_WAITING}) STORED,
            ADD COLUMN leased double precision GENERATED ALWAYS AS ({_LEASED}) STORED,
            ADD COLUMN batch_id text GENERATED ALWAYS AS ({_BATCH_ID}) STORED,
            ADD COLUMN batch_status text GENERATED ALWAYS AS ({_BATCH_STATUS}) STORED
        """,
        # After the rewrite, so that only pages written from now on keep room for the HOT
        # versions (the finished rows of a big ledger stay packed).
        "ALTER TABLE asyncbg_jobs SET (fillfactor = 70)",
        # What a claim reads, in claim order: the rows nobody holds; live (or sending) ones
        # handed back, for a full worker that adopts only live ones and for status; and the
        # leases by when they run out.
        "CREATE INDEX asyncbg_jobs_waiting ON asyncbg_jobs (seq) WHERE waiting IS NOT NULL",
        "CREATE INDEX asyncbg_jobs_released ON asyncbg_jobs (seq) "
        "WHERE waiting IN ('sending', 'live')",
        "CREATE INDEX asyncbg_jobs_leased ON asyncbg_jobs (leased) WHERE leased IS NOT NULL",
        "CREATE INDEX asyncbg_jobs_batched ON asyncbg_jobs (batch_id, batch_status, created) "
        "WHERE batch_id IS NOT NULL",
        *_tally_functions(_FENCE),
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
#: Params: after (a seq), limit. One page of RECORDS, from the seq index.
RECORDS_PAGE = f"SELECT seq, {_COLUMNS} FROM asyncbg_jobs WHERE seq > %s ORDER BY seq LIMIT %s"
RESUBMITS = "SELECT COALESCE(sum(resubmits), 0) FROM asyncbg_jobs"
#: Jobs per state and status, from the counters (version 3): a few dozen rows at any size.
COUNTS = """
    SELECT state, status, sum(n)::bigint FROM asyncbg_counts
    GROUP BY state, status HAVING sum(n) <> 0 ORDER BY state, status
"""
SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
TALLIES = """
    SELECT COALESCE(sum(resubmits), 0)::bigint, COALESCE(sum(input), 0)::bigint,
           COALESCE(sum(output), 0)::bigint
    FROM asyncbg_tallies
"""
# The rows in one state of sending or live, in claim order: those handed back (the index of
# released rows) and those held (the lease index: as many as the fleet runs at once; the state
# is read from each row, as no index names it since schema 8).
_IN_STATE = """
    SELECT {columns} FROM (
        SELECT seq, {columns} FROM asyncbg_jobs WHERE waiting = '{state}'
        UNION ALL
        SELECT seq, {columns} FROM asyncbg_jobs WHERE leased IS NOT NULL AND state = '{state}'
    ) AS s ORDER BY seq
"""
LIVE_ROWS = _IN_STATE.format(columns="key, response_id, status, created", state="live")
LIVE_RECORDS = _IN_STATE.format(columns=_COLUMNS, state="live")
#: The keys being sent, each with whether a lease that has not run out holds it (a running
#: worker records its create's answer) or not (its holder is gone: a worker sends it again).
SENDING_KEYS = f"""
    SELECT key, held FROM (
        SELECT seq, key, false AS held FROM asyncbg_jobs WHERE waiting = 'sending'
        UNION ALL
        SELECT seq, key, lease_until > {_NOW} AS held FROM asyncbg_jobs
        WHERE leased IS NOT NULL AND state = 'sending'
    ) AS s ORDER BY seq
"""
#: The jobs of remote batches by batch (what precedes the last #) and status, from the covering
#: index asyncbg_jobs_batched.
BATCH_GROUPS = """
    SELECT batch_id, batch_status, count(*), min(created) FROM asyncbg_jobs
    WHERE batch_id IS NOT NULL GROUP BY 1, 2
"""
UNFINISHED = """
    SELECT COALESCE(sum(n), 0)::bigint FROM asyncbg_counts
    WHERE state IN ('new', 'sending', 'live')
"""

# -- claims -------------------------------------------------------------------------------------

# Params: key, digest, request, owner, lease.
CLAIM_INSERT = f"""
    INSERT INTO asyncbg_jobs (key, digest, request, state, status, created, updated, owner,
                              epoch, lease_until)
    VALUES (%s, %s, %s, 'new', 'pending', {_NOW}, {_NOW}, %s, 1, {_NOW} + %s)
    ON CONFLICT (key) DO NOTHING
    RETURNING {_COLUMNS}, epoch
"""
#: When a lease can be taken over: once it ran out, and one safety margin (the param
#: ``margin``) later when its holder's create may be in flight (it wrote ``sending`` at its
#: epoch): by then that create's answer is recorded, or known lost (schema version 4).
_TAKEN_OVER_AT = ("lease_until + CASE WHEN state = 'sending' AND sent_epoch = epoch "
                  "THEN %(margin)s ELSE 0 END")
# Params: owner, margin, key. `elsewhere`: another live owner holds it. CLAIM_READ decides
# outcomes that change nothing (DONE, MISMATCH, FOLLOW) without a transaction; CLAIM_LOCK,
# inside one, decides again before a write.
_CLAIM_SELECT = f"""
    SELECT {_COLUMNS},
           owner IS NOT NULL AND owner <> %(owner)s AND {_TAKEN_OVER_AT} > {_NOW} AS elsewhere
    FROM asyncbg_jobs WHERE key = %(key)s
"""
CLAIM_READ = _CLAIM_SELECT
CLAIM_LOCK = _CLAIM_SELECT + " FOR UPDATE"
# Each takes the lease (owner, lease) and bumps the epoch; then the claim rules' own changes.
_TAKE = f"owner = %(owner)s, epoch = epoch + 1, lease_until = {_NOW} + %(lease)s"
CLAIM_RESET = f"""
    UPDATE asyncbg_jobs SET digest = %(digest)s, request = %(request)s, state = 'new',
        response_id = NULL, status = 'pending', body = NULL, input_tokens = NULL,
        output_tokens = NULL, error = NULL, error_code = NULL, http_status = NULL,
        request_id = NULL, updated = {_NOW}, {_TAKE}
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

# A terminal outcome with its webhook notification (most go through WRITE_MANY below). Params:
# id, url, body (the notification), then state, response_id, status, body, input_tokens,
# output_tokens, error, error_code, http_status, request_id, key, owner, epoch. One statement,
# so one transaction: the outcome and its notification are written together or not at all. It
# returns the key when the fenced update matched. A finished key needs no lease any more.
RECORD_TERMINAL_NOTIFY = f"""
    WITH notice AS (SELECT %s::text AS id, %s::text AS url, %s::bytea AS body),
    done AS (
        UPDATE asyncbg_jobs SET state = %s, response_id = COALESCE(%s, response_id),
            status = %s, body = %s, input_tokens = %s, output_tokens = %s, error = %s,
            error_code = %s, http_status = %s,
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
# A fleet worker's kept response (see _rescue.py): taken by a row with no response id that
# is still `sending` at the epoch it was sent at, or, for the same request, with nobody
# holding a live lease on it: put back to waiting (`new`), ended without a response
# (`local`), or `sending` at a later epoch by a worker gone since. That worker's create may
# have left (it is counted a possible duplicate) or not (it was stopped before it sent: the
# usual case); either way, creating the line once more could only add one. Then live, with
# no owner (any worker takes it to poll it), and a new epoch (a holder since is fenced off).
# One statement: the row is checked again as it is once locked (a claim or a `sending` write
# that committed first makes it match nothing). Params: response_id, key, epoch, digest.
ADOPT_KEPT = f"""
    UPDATE asyncbg_jobs SET state = 'live', response_id = %(response_id)s,
        status = 'in_progress', updated = {_NOW}, owner = NULL, lease_until = NULL,
        epoch = epoch + 1, error = NULL, error_code = NULL, http_status = NULL,
        request_id = NULL,
        resubmits = resubmits + CASE WHEN state = 'sending'
                                      AND sent_epoch IS DISTINCT FROM %(epoch)s
                                 THEN 1 ELSE 0 END
    WHERE key = %(key)s AND response_id IS NULL
      AND ((state = 'sending' AND sent_epoch = %(epoch)s)
           OR (state IN ('new', 'local', 'sending') AND digest = %(digest)s::text
               AND (owner IS NULL OR lease_until IS NULL OR lease_until <= {_NOW})))
"""
ROW_OF = "SELECT state, response_id FROM asyncbg_jobs WHERE key = %s"

# The same three writes for many keys at once, in one statement (writes that arrive while one
# is on its way go together in the next: see PostgresLedger._grouped). A key has at most one
# write waiting (the engine awaits each before the next), so the three parts touch different
# rows. Params: owner, then each part's rows as one JSON array of arrays (text: the same types
# at every call, so the statement is prepared once and planned once per connection, and the
# client dumps one string per part, not one array per column); a terminal body is base64, with
# its tokens (null: the trigger parses the body). It returns the keys not written (their leases
# are elsewhere): none, nearly always, so nothing to send back and read.
WRITE_MANY = f"""
    WITH sent_rows AS MATERIALIZED (
        SELECT w->>0 AS key, (w->>1)::integer AS resubmit, (w->>2)::bigint AS epoch
        FROM jsonb_array_elements(%(sent)s::jsonb) AS w
    ),
    live_rows AS MATERIALIZED (
        SELECT w->>0 AS key, w->>1 AS response_id, w->>2 AS status, (w->>3)::bigint AS epoch
        FROM jsonb_array_elements(%(live)s::jsonb) AS w
    ),
    ended_rows AS MATERIALIZED (
        SELECT w->>0 AS key, w->>1 AS state, w->>2 AS response_id, w->>3 AS status,
               decode(w->>4, 'base64') AS body, (w->>5)::bigint AS input_tokens,
               (w->>6)::bigint AS output_tokens, w->>7 AS error, w->>8 AS error_code,
               (w->>9)::integer AS http_status, w->>10 AS request_id,
               (w->>11)::bigint AS epoch
        FROM jsonb_array_elements(%(ended)s::jsonb) AS w
    ),
    sent AS (
        UPDATE asyncbg_jobs j SET state = 'sending', response_id = NULL, status = 'pending',
            resubmits = j.resubmits + b.resubmit, updated = {_NOW}, sent_epoch = j.epoch
        FROM sent_rows b
        WHERE j.key = b.key AND j.owner = %(owner)s AND j.epoch = b.epoch
        RETURNING j.key
    ),
    live AS (
        UPDATE asyncbg_jobs j SET state = 'live',
            response_id = COALESCE(b.response_id, j.response_id), status = b.status,
            updated = {_NOW}
        FROM live_rows b
        WHERE j.key = b.key AND j.owner = %(owner)s AND j.epoch = b.epoch
        RETURNING j.key
    ),
    ended AS (
        UPDATE asyncbg_jobs j SET state = b.state,
            response_id = COALESCE(b.response_id, j.response_id), status = b.status,
            body = b.body, input_tokens = b.input_tokens, output_tokens = b.output_tokens,
            error = b.error, error_code = b.error_code,
            http_status = b.http_status, request_id = b.request_id, updated = {_NOW},
            lease_until = NULL
        FROM ended_rows b
        WHERE j.key = b.key AND j.owner = %(owner)s AND j.epoch = b.epoch
        RETURNING j.key
    )
    SELECT key FROM sent_rows WHERE key NOT IN (SELECT key FROM sent)
    UNION ALL SELECT key FROM live_rows WHERE key NOT IN (SELECT key FROM live)
    UNION ALL SELECT key FROM ended_rows WHERE key NOT IN (SELECT key FROM ended)
"""

# -- the fleet -------------------------------------------------------------------------------------

# Params: keys, digests, requests (arrays). Waiting jobs: no owner.
ENQUEUE = f"""
    INSERT INTO asyncbg_jobs (key, digest, request, state, status, created, updated)
    SELECT i.key, i.digest, i.request, 'new', 'pending', {_NOW}, {_NOW}
    FROM unnest(%s::text[], %s::text[], %s::bytea[]) WITH ORDINALITY AS i(key, digest, request, n)
    ORDER BY i.n
    ON CONFLICT (key) DO NOTHING
"""
#: The channel that says "work may be waiting" (an enqueue, a release, a requeue), delivered at
#: commit to every session LISTENing on this database; the payload is the schema, as ledgers in
#: other schemas of the database share the channel (a wake-up for them is only an extra look).
CHANNEL = "asyncbg_work"
LISTEN = f"LISTEN {CHANNEL}"
WORK_ARRIVED = f"SELECT pg_notify('{CHANNEL}', current_schema())"
# A big file (more than a few thousand lines): COPY into a table of the transaction's own, then
# one INSERT ... SELECT; the same rules as ENQUEUE and ENQUEUE_MISMATCH.
ENQUEUE_TABLE = """
    CREATE TEMPORARY TABLE asyncbg_enqueue (n bigint, key text, digest text, request bytea)
    ON COMMIT DROP
"""
ENQUEUE_COPY = "COPY asyncbg_enqueue (n, key, digest, request) FROM STDIN"
ENQUEUE_FROM_TABLE = f"""
    INSERT INTO asyncbg_jobs (key, digest, request, state, status, created, updated)
    SELECT e.key, e.digest, e.request, 'new', 'pending', {_NOW}, {_NOW}
    FROM asyncbg_enqueue e ORDER BY e.n
    ON CONFLICT (key) DO NOTHING
"""
ENQUEUE_TABLE_MISMATCH = """
    SELECT e.key FROM asyncbg_enqueue e JOIN asyncbg_jobs j ON j.key = e.key
    WHERE j.digest <> e.digest ORDER BY e.n LIMIT 1
"""
#: Params: milliseconds (text). A big enqueue's own statement timeout, for its transaction.
SET_LOCAL_TIMEOUT = "SELECT set_config('statement_timeout', %s, true)"
# Params: keys, digests. The first key already there with another request.
ENQUEUE_MISMATCH = """
    SELECT j.key FROM asyncbg_jobs j
    JOIN unnest(%s::text[], %s::text[]) WITH ORDINALITY AS i(key, digest, n) ON j.key = i.key
    WHERE j.digest <> i.digest ORDER BY i.n LIMIT 1
"""
# Params: owner, lease, margin; the limit is written into the statement (acquire(): a plan made
# once for a limit of n is good for every call with n, where a plan for LIMIT $1 is made for
# any limit and may sort every waiting row). Rows another acquire is taking right now are
# skipped, not waited for; the UPDATE sees each row as it is once locked. Waiting rows (no
# lease) come from one partial index in claim order (``live_only``: the released rows' index,
# live responses only), expired leases from another by expiry: neither reads a row that is
# leased and running, however many there are.
_ACQUIRE = f"""
    WITH waiting AS (
        SELECT key, seq FROM asyncbg_jobs
        WHERE {{waiting}}
        ORDER BY seq LIMIT {{limit}}
        FOR UPDATE SKIP LOCKED
    ),
    expired AS (
        SELECT key, seq FROM asyncbg_jobs
        WHERE leased <= {_NOW} AND {{held}}
          AND {_TAKEN_OVER_AT} <= {_NOW}
        ORDER BY leased LIMIT {{limit}}
        FOR UPDATE SKIP LOCKED
    ),
    picked AS (
        SELECT key FROM (SELECT * FROM waiting UNION ALL SELECT * FROM expired) AS p
        ORDER BY seq LIMIT {{limit}}
    )
    UPDATE asyncbg_jobs j
    SET owner = %(owner)s, epoch = j.epoch + 1, lease_until = {_NOW} + %(lease)s
    FROM picked WHERE j.key = picked.key
    RETURNING {_J_COLUMNS}, j.epoch, j.seq
"""


@functools.lru_cache(maxsize=512)
def acquire(limit: int, *, live_only: bool = False) -> str:
    """The claim of up to ``limit`` (a positive int) jobs, or of live responses only."""
    if not (isinstance(limit, int) and limit > 0):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    if live_only:
        return _ACQUIRE.format(waiting="waiting = 'live'", held="state = 'live'",
                               limit=int(limit))
    return _ACQUIRE.format(waiting="waiting IS NOT NULL", held="true", limit=int(limit))


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
# The epoch stays: the next taker bumps it. Listening workers are woken when any came back.
RELEASE = f"""
    WITH released AS (
        UPDATE asyncbg_jobs j SET owner = NULL, lease_until = NULL
        FROM unnest(%(keys)s::text[], %(epochs)s::bigint[]) AS h(key, epoch)
        WHERE j.key = h.key AND j.epoch = h.epoch AND j.owner = %(owner)s
          AND j.state IN ('new', 'sending', 'live')
        RETURNING j.key
    )
    SELECT pg_notify('{CHANNEL}', current_schema()) WHERE EXISTS (SELECT 1 FROM released)
"""
# Back to waiting: only what this owner ended locally (nothing was paid for).
REQUEUE = f"""
    WITH requeued AS (
        UPDATE asyncbg_jobs SET state = 'new', response_id = NULL, status = 'pending',
            body = NULL, input_tokens = NULL, output_tokens = NULL, error = NULL,
            error_code = NULL, http_status = NULL, request_id = NULL,
            owner = NULL, lease_until = NULL, updated = {_NOW}
        WHERE key = ANY(%(keys)s::text[]) AND owner = %(owner)s AND state = 'local'
          AND (%(codes)s::text[] IS NULL OR error_code = ANY(%(codes)s::text[]))
        RETURNING key
    )
    SELECT pg_notify('{CHANNEL}', current_schema()) WHERE EXISTS (SELECT 1 FROM requeued)
"""
# An operator's retry: whoever ended them; never a key with a response id (paid for). Workers
# see them at their next timed look (no NOTIFY here: the count is the statement's rowcount).
REQUEUE_UNPAID = f"""
    UPDATE asyncbg_jobs SET state = 'new', status = 'pending', body = NULL, input_tokens = NULL,
        output_tokens = NULL, error = NULL, error_code = NULL, http_status = NULL,
        request_id = NULL, owner = NULL,
        lease_until = NULL, updated = {_NOW}
    WHERE state = 'local' AND response_id IS NULL
      AND (%(code)s::text IS NULL OR error_code = %(code)s::text)
"""
# One pass over the running leases (the leased index), not one per worker.
WORKERS = f"""
    SELECT w.owner, w.host, w.pid, w.started, w.seen, w.lease, COALESCE(h.n, 0)
    FROM asyncbg_workers w
    LEFT JOIN (
        SELECT owner, count(*) AS n FROM asyncbg_jobs WHERE leased > {_NOW} GROUP BY owner
    ) AS h ON h.owner = w.owner
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
# Both parts see the rows as they were before the statement: a delivered row whose lease ran
# out while it was posted would be picked too, and which of the DELETE and the UPDATE of one
# row wins is not defined (it was leased again and posted twice). ``picked`` leaves ``done``
# out, so that no row is touched twice (tests/test_pg_faults.py shows it).
_TAKE = f"""
    WITH gone AS (DELETE FROM asyncbg_outbox WHERE id = ANY(%(done)s::text[])),
    picked AS (
        SELECT o.id FROM asyncbg_outbox o
        WHERE o.state = 'pending' AND {{url}} AND o.next_at <= {_NOW}
          AND (o.lease_until IS NULL OR o.lease_until <= {_NOW})
          AND o.id <> ALL(%(done)s::text[])
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
