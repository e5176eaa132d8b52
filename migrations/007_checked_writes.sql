-- Canvalo chat: users read their chat data through the Data API, and only the service's checked functions write it.
--
-- Apply after 001-006 with the SQL editor or `psql "$DATABASE_URL" -f migrations/007_checked_writes.sql`; safe to run
-- more than once. It brings a deployment of 001-006 to this security model:
--
-- * The `authenticated` role may SELECT its own rows of the chat tables (row-level security, as before) and nothing
--   more: no INSERT, UPDATE or DELETE on agent_conversations, agent_messages, agent_runs, agent_run_events or
--   pending_actions. (001-005 let a user insert runs, point them at any message and flush over it, revive ended
--   runs, forge events and plant message metadata that the service trusted.)
-- * Every write is one of the functions below. They are SECURITY DEFINER (they write tables the caller cannot), so
--   row-level security does not apply inside them: each one checks explicitly that every row it touches is the
--   caller's (auth.uid()) and every reference between rows holds: a run's messages are the ones its begin wrote, in
--   its conversation; a run is written only while it is running, only forward in seq, only by the worker that began
--   it (it holds the run's write key, which never leaves the service); a terminal state is written once.
-- * The database keeps its own ceiling on how fast one user adds rows (canvalo_private.settings, writes_per_minute,
--   default 240): the service's limits are arguments a direct caller could leave out, this one is not.
-- * canvalo_private is closed to `authenticated`: its tables and helpers are reached only through these functions.
-- * The business tables (002) are unchanged: the frontend may keep reading and writing a user's own records through
--   the Data API, under their row-level security and column grants. Confirming a pending action changes a record
--   only as that user could, column grants included.
--
-- New and changed calls (all as the signed-in user; nothing is granted to `anon`):
--
--   POST /rest/v1/rpc/agent_conversation_create  {"p_id", "p_title"}  -> {"outcome": "done", "conversation": {...}}
--        | {"outcome": "not_found"} (the id is someone else's) | {"outcome": "rate_limited", "retry_after": 4.2}
--   POST /rest/v1/rpc/agent_conversation_rename  {"p_id", "p_title"}  -> the conversation | null
--   POST /rest/v1/rpc/agent_conversation_delete  {"p_id"}  -> true | false
--   POST /rest/v1/rpc/agent_run_begin            004's arguments and "p_write_key"
--   POST /rest/v1/rpc/agent_runs_flush           004's, each update also carrying its run's "write_key"

begin;

-- -- the Data API: read only on the chat tables -----------------------------------------------------------------------

-- Runs that 004's grants let a user write pointing across conversations or users (at another user's messages, say):
-- removed with their events, so no function below meets a reference it did not check itself.
delete from api.agent_runs r
 where not exists (select 1 from api.agent_conversations c where c.id = r.conversation_id and c.user_id = r.user_id)
    or not exists (select 1 from api.agent_messages m
                    where m.id = r.user_message_id and m.conversation_id = r.conversation_id and m.role = 'user')
    or not exists (select 1 from api.agent_messages m
                    where m.id = r.assistant_message_id and m.conversation_id = r.conversation_id
                      and m.role = 'assistant');

-- Helpers from 004 and 006 that trusted rows a user could write, or that the invoker functions needed.
drop function if exists canvalo_private.add_answer(uuid, uuid, uuid);
drop function if exists canvalo_private.set_answer(uuid, text, integer, jsonb, text);
drop function if exists canvalo_private.matching_conversations(tsquery);

-- -- canvalo_private: the write keys of runs and the database's own ceiling -------------------------------------------

-- A run's write key, hashed: agent_run_begin stores it, agent_runs_flush requires it.
create table if not exists canvalo_private.run_keys (
    run_id uuid primary key references api.agent_runs (id) on delete cascade,
    key_hash bytea not null
);
alter table canvalo_private.run_keys enable row level security;

create table if not exists canvalo_private.settings (
    name text primary key,
    value integer not null check (value >= 1)
);
alter table canvalo_private.settings enable row level security;
insert into canvalo_private.settings (name, value) values ('writes_per_minute', 240) on conflict (name) do nothing;

alter table canvalo_private.rate_limits drop constraint if exists rate_limits_bucket_check;
alter table canvalo_private.rate_limits add constraint rate_limits_bucket_check
    check (bucket in ('chat', 'api', 'writes'));

-- The Data API surface of the chat tables: SELECT for `authenticated` under row-level security, nothing more, and
-- canvalo_private closed. Called at the end of this file, and at the end of 001, 004, 005 and 006 once this file has
-- run: running one of those again alone would otherwise bring back its grants, write policies and SECURITY INVOKER
-- functions that trust rows. Such a function (an earlier version of one of 007's) stays closed, with a warning,
-- until this file runs again. REVOKE on a table takes its column privileges with it.
create or replace function canvalo_private.lock_chat_writes()
returns void
language plpgsql
set search_path = ''
as $$
declare
    p record;
    f record;
begin
    revoke all on api.agent_conversations, api.agent_messages, api.agent_runs, api.agent_run_events,
                  api.pending_actions from public, anon, authenticated;
    grant select on api.agent_conversations, api.agent_messages, api.agent_runs, api.agent_run_events,
                    api.pending_actions to authenticated;
    for p in
        select pol.policyname, pol.tablename from pg_catalog.pg_policies pol
         where pol.schemaname = 'api' and pol.cmd <> 'SELECT'
           and pol.tablename in ('agent_conversations', 'agent_messages', 'agent_runs', 'agent_run_events',
                                 'pending_actions')
    loop
        execute format('drop policy %I on api.%I', p.policyname, p.tablename);
    end loop;
    revoke all on schema canvalo_private from public, anon, authenticated;
    revoke all on all tables in schema canvalo_private from public, anon, authenticated;
    revoke all on all functions in schema canvalo_private from public, anon, authenticated;
    for f in
        select fn.oid::pg_catalog.regprocedure as signature
          from pg_catalog.pg_proc fn join pg_catalog.pg_namespace n on n.oid = fn.pronamespace
         where n.nspname = 'api' and not fn.prosecdef
           and fn.proname in ('agent_run_begin', 'agent_runs_flush', 'agent_runs_maintain', 'agent_run_stop',
                              'pending_action_create', 'pending_action_confirm', 'agent_conversations_search')
    loop
        execute format('revoke all on function %s from public, anon, authenticated', f.signature);
        raise warning 'canvalo: % comes from an earlier migration and is closed: apply 007_checked_writes.sql again',
            f.signature;
    end loop;
end;
$$;

-- The signed-in caller, or 42501.
create or replace function canvalo_private.caller()
returns uuid
language plpgsql
stable
set search_path = ''
as $$
declare
    uid uuid := auth.uid();
begin
    if uid is null then
        raise exception 'a signed-in user is required' using errcode = '42501';
    end if;
    return uid;
end;
$$;

-- Count one row-adding call of p_user against the database's ceiling; the seconds until the window ends when over
-- it, else null. The same fixed window as api.rate_limit_hit.
create or replace function canvalo_private.over_write_ceiling(p_user uuid)
returns double precision
language plpgsql
volatile
set search_path = ''
as $$
declare
    now_ts timestamptz := clock_timestamp();
    this_window timestamptz := to_timestamp(floor(extract(epoch from clock_timestamp()) / 60) * 60);
    counted integer;
    current_start timestamptz;
begin
    insert into canvalo_private.rate_limits as r (user_id, bucket, window_seconds, window_start, hits)
    values (p_user, 'writes', 60, this_window, 1)
    on conflict (user_id, bucket, window_seconds) do update
        set hits = case when excluded.window_start > r.window_start then 1 else r.hits + 1 end,
            window_start = greatest(r.window_start, excluded.window_start)
    returning r.hits, r.window_start into counted, current_start;
    if counted <= (select s.value from canvalo_private.settings s where s.name = 'writes_per_minute') then
        return null;
    end if;
    return greatest(0, extract(epoch from (current_start - now_ts)) + 60);
end;
$$;

create or replace function canvalo_private.key_hash(p_key text)
returns bytea
language sql
immutable
set search_path = ''
as $$
    select pg_catalog.sha256(pg_catalog.convert_to(p_key, 'UTF8'))
$$;

-- The chunk a run ends with when its worker died (services/store/run_log.py: complete_chunk, interrupted_chunk) as the
-- frame run_log.frame writes: compact JSON (Python's separators=(',', ':')), keys in the same order. The chunk is
-- flat, so joining its members in order gives Python's exact characters.
create or replace function canvalo_private.terminal_frame(
    p_run_id uuid, p_seq integer, p_status text, p_agent_type text, p_message_id uuid, p_conversation_id uuid
)
returns text
language sql
stable
set search_path = ''
as $$
    select 'id: ' || p_seq || E'\ndata: {'
           || string_agg(to_json(member.key)::text || ':' || member.value::text, ',' order by member.n)
           || E'}\n\n'
      from json_each(case when p_status = 'stopped' then json_build_object(
                'type', 'complete', 'content', null, 'tool_name', null, 'tool_call', null, 'error', null,
                'agent_type', p_agent_type, 'run_id', p_run_id, 'message_id', p_message_id,
                'conversation_id', p_conversation_id, 'usage', null, 'stop_reason', 'stopped', 'status', 'stopped')
           else json_build_object(
                'type', 'error', 'content', null, 'tool_name', null, 'tool_call', null,
                'error', 'The answer was interrupted because the server generating it stopped.'
                         ' Please send your message again.',
                'agent_type', 'supervisor', 'code', 'RUN_INTERRUPTED', 'retryable', true, 'run_id', p_run_id)
           end) with ordinality as member (key, value, n)
$$;

-- -- conversations ------------------------------------------------------------------------------------------------

-- Store.create_conversation: a conversation of the caller's with this id. A replay (the id is the service's)
-- inserts nothing and answers the row; an id that is someone else's is `not_found`, as SQLite answers.
create or replace function api.agent_conversation_create(p_id uuid, p_title text default null)
returns jsonb
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
    conversation api.agent_conversations;
    wait_seconds double precision;
begin
    if p_id is null or char_length(p_title) > 200 then
        raise exception 'invalid conversation' using errcode = '22023';
    end if;
    select * into conversation from api.agent_conversations c where c.id = p_id;
    if not found then
        wait_seconds := canvalo_private.over_write_ceiling(uid);
        if wait_seconds is not null then
            return jsonb_build_object('outcome', 'rate_limited', 'retry_after', wait_seconds);
        end if;
        insert into api.agent_conversations (id, user_id, title) values (p_id, uid, p_title)
        on conflict (id) do nothing;
        select * into conversation from api.agent_conversations c where c.id = p_id;
    end if;
    if conversation.user_id is distinct from uid then
        return jsonb_build_object('outcome', 'not_found');
    end if;
    return jsonb_build_object('outcome', 'done', 'conversation', to_jsonb(conversation) - 'words');
end;
$$;

-- Store.rename_conversation: the caller's conversation with its new title (001's trigger moves updated_at), or null.
create or replace function api.agent_conversation_rename(p_id uuid, p_title text)
returns jsonb
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
    conversation api.agent_conversations;
begin
    if p_title is null or char_length(p_title) not between 1 and 200 then
        raise exception 'invalid title' using errcode = '22023';
    end if;
    update api.agent_conversations c set title = p_title where c.id = p_id and c.user_id = uid
    returning * into conversation;
    if not found then
        return null;
    end if;
    return to_jsonb(conversation) - 'words';
end;
$$;

-- Store.delete_conversation: the caller's conversation, with its messages, runs and events (foreign keys cascade).
-- A run still generating finds itself gone at its next flush and stops.
create or replace function api.agent_conversation_delete(p_id uuid)
returns boolean
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
begin
    delete from api.agent_conversations c where c.id = p_id and c.user_id = uid;
    return found;
end;
$$;

-- -- chat runs ----------------------------------------------------------------------------------------------------
-- 004's functions, now SECURITY DEFINER with every ownership check explicit. Each takes "now" from now(): one
-- instant per transaction, as SQLite takes one time.time() per call.

drop function if exists api.agent_run_begin(uuid, uuid, text, text, uuid, uuid, double precision, double precision,
                                            integer, integer, uuid, integer, integer);

-- Store.maintain_runs for the caller's runs (sqlite_runs._maintain). First the runs whose worker stopped heartbeating
-- end (_reap): `interrupted`, or `stopped` cut to the characters the user saw when a stop was asked, with the last
-- saved text and a terminal event; each is claimed first (UPDATE ... WHERE status = 'running'), so two workers
-- reaping at once end it once. Then the runs that ended more than p_events_ttl seconds ago lose their events but
-- their last batch, which holds the terminal event (a late resume still ends cleanly), once.
create or replace function api.agent_runs_maintain(p_stale_seconds double precision, p_events_ttl double precision)
returns void
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
    dead record;
    streamed text;
begin
    if p_stale_seconds is null or p_stale_seconds <= 0 or p_events_ttl is null or p_events_ttl < 0 then
        raise exception 'invalid run maintenance arguments' using errcode = '22023';
    end if;
    for dead in
        -- The terminal event's id is past every id a viewer can have been shown: a worker shows at most 1,000
        -- events past its last saved one (services/store/run_log.py, UNSAVED_EVENTS_MAX and reaped_seq).
        update api.agent_runs r
           set status = case when r.stop_requested then 'stopped' else 'interrupted' end,
               ended_at = now(),
               last_seq = coalesce((select max(e.last_seq) from api.agent_run_events e where e.run_id = r.id), 0)
                          + 1001
         where r.user_id = uid
           and r.status = 'running'
           and r.heartbeat_at < now() - make_interval(secs => p_stale_seconds)
        returning r.id, r.conversation_id, r.assistant_message_id, r.status, r.stop_seen_chars, r.last_seq
    loop
        -- The answer its saved events stream (they run ahead of the text saved every second), so its stored text
        -- and its replay say the same (services/store/run_log.py, streamed_text: the token chunks' content, in order).
        select string_agg(case when strpos(part.frame, E'\ndata: {"type":"token",') > 0
                               then (substr(part.frame, strpos(part.frame, 'data: ') + 6)::jsonb) ->> 'content' end,
                          '' order by e.seq, part.n)
          into streamed
          from api.agent_run_events e
         cross join lateral regexp_split_to_table(e.frames, E'\n\n') with ordinality as part (frame, n)
         where e.run_id = dead.id;
        -- The run's own answer: begin wrote it in the run's conversation, and no one else can repoint a run.
        update api.agent_messages m
           set content = case when dead.status = 'stopped' and dead.stop_seen_chars is not null
                              then left(coalesce(streamed, m.content), dead.stop_seen_chars)
                              else coalesce(streamed, m.content) end,
               metadata = case when dead.status = 'stopped'
                               then jsonb_build_object('status', 'stopped', 'run_id', dead.id)
                               else jsonb_build_object('status', 'interrupted', 'run_id', dead.id,
                                                       'error_code', 'RUN_INTERRUPTED') end
         where m.id = dead.assistant_message_id and m.conversation_id = dead.conversation_id
           and m.role = 'assistant';
        insert into api.agent_run_events (run_id, seq, last_seq, frames)
        select dead.id, dead.last_seq, dead.last_seq,
               canvalo_private.terminal_frame(dead.id, dead.last_seq, dead.status, m.agent_type,
                                              dead.assistant_message_id, dead.conversation_id)
          from api.agent_messages m
         where m.id = dead.assistant_message_id and m.conversation_id = dead.conversation_id
        on conflict do nothing;
    end loop;

    with expired as (
        update api.agent_runs r
           set events_purged = true
         where r.user_id = uid
           and r.ended_at < now() - make_interval(secs => p_events_ttl)
           and not r.events_purged
        returning r.id, r.last_seq
    )
    delete from api.agent_run_events e
     using expired
     where e.run_id = expired.id and e.last_seq < expired.last_seq;
end;
$$;

-- Store.begin_run (sqlite_runs.begin_run), in the same order: a replay of this very call and a repeated
-- client_message_id are answered first and count nothing; then the database's write ceiling; then the caller's runs
-- are maintained (dead ones end, expired events go); someone else's conversation is `not_found` and a run still going
-- in this one `in_progress`; then the chat-rate hit (it stays counted when refused, so a refusal is returned, never
-- raised) and the stream slots; then the conversation, the user's message, the answer's placeholder, the run and its
-- write key. Only the holder of p_write_key can flush the run: the service makes a fresh one per run and never sends
-- it to a client, so a user calling this function directly gets a run of their own that the service never writes.
create or replace function api.agent_run_begin(
    p_run_id uuid,
    p_conversation_id uuid,
    p_text text,
    p_title text,
    p_user_message_id uuid,
    p_assistant_message_id uuid,
    p_stale_seconds double precision,
    p_events_ttl double precision,
    p_window_seconds integer,
    p_history_limit integer,
    p_write_key text,
    p_client_message_id uuid default null,
    p_chat_limit integer default null,
    p_stream_limit integer default null
)
returns jsonb
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
    run api.agent_runs;
    earlier_text text;
    inserted integer;
    created boolean := false;
    allowed boolean;
    retry_seconds double precision;
    held integer;
    oldest timestamptz;
    refusal jsonb;
begin
    if p_history_limit is null or p_history_limit < 0 or char_length(p_write_key) is distinct from 64
       or p_text is null or char_length(p_text) not between 1 and 10000 or char_length(p_title) > 200
       or p_user_message_id is not distinct from p_assistant_message_id then
        raise exception 'invalid chat turn' using errcode = '22023';
    end if;
    -- One begin at a time per user (SQLite's BEGIN IMMEDIATE): the checks below then see every earlier begin of the
    -- user, so two workers can neither both take the last stream slot nor both start a deduplicated message.
    perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('canvalo.agent_runs:' || uid::text, 0));

    select * into run from api.agent_runs r where r.id = p_run_id and r.user_id = uid;
    if found then
        -- A replay of this call. Its run still running means the first answer was lost before anyone could start
        -- generating it, so it is `started` again (below), for the holder of its key only; otherwise `existing`.
        if run.status <> 'running' or not exists (
            select 1 from canvalo_private.run_keys k
             where k.run_id = run.id and k.key_hash = canvalo_private.key_hash(p_write_key)) then
            return jsonb_build_object('outcome', 'existing', 'run', to_jsonb(run));
        end if;
    else
        if p_client_message_id is not null then
            select * into run from api.agent_runs r
             where r.user_id = uid and r.client_message_id = p_client_message_id;
            if found then
                select m.content into earlier_text from api.agent_messages m
                 where m.id = run.user_message_id and m.conversation_id = run.conversation_id;
                return jsonb_build_object(
                    'outcome', case when run.conversation_id = p_conversation_id
                                     and earlier_text is not distinct from p_text then 'existing' else 'conflict' end,
                    'run', to_jsonb(run));
            end if;
        end if;

        retry_seconds := canvalo_private.over_write_ceiling(uid);
        if retry_seconds is not null then
            return jsonb_build_object('outcome', 'rate_limited', 'retry_after', retry_seconds);
        end if;

        perform api.agent_runs_maintain(p_stale_seconds, p_events_ttl);

        -- "Not the caller's" is missing or someone else's; the insert tells the two apart (ON CONFLICT DO NOTHING
        -- skips a row whatever its owner).
        if not exists (select 1 from api.agent_conversations c where c.id = p_conversation_id and c.user_id = uid) then
            insert into api.agent_conversations (id, user_id, title) values (p_conversation_id, uid, p_title)
            on conflict (id) do nothing;
            get diagnostics inserted = row_count;
            if inserted = 0 then
                return jsonb_build_object('outcome', 'not_found');
            end if;
            created := true;
        end if;

        select * into run from api.agent_runs r where r.conversation_id = p_conversation_id and r.status = 'running';
        if found then
            return jsonb_build_object('outcome', 'in_progress', 'run', to_jsonb(run));
        end if;

        if p_chat_limit is not null then
            select h.allowed, h.retry_after into allowed, retry_seconds
              from api.rate_limit_hit('chat', p_window_seconds, p_chat_limit) h;
            if not allowed then
                refusal := jsonb_build_object('outcome', 'rate_limited', 'retry_after', retry_seconds);
            end if;
        end if;
        if refusal is null and p_stream_limit is not null then
            select count(*), min(r.heartbeat_at) into held, oldest
              from api.agent_runs r where r.user_id = uid and r.status = 'running';
            if held >= p_stream_limit then
                -- The soonest a slot frees without a run ending: the oldest heartbeat lapsing.
                retry_seconds := greatest(0, extract(epoch from oldest - now()) + p_stale_seconds);
                refusal := jsonb_build_object('outcome', 'streams_full', 'retry_after', retry_seconds);
            end if;
        end if;
        if refusal is not null then
            -- A refused turn writes nothing (the counted hits aside): take back the conversation made for it above.
            if created then
                delete from api.agent_conversations c where c.id = p_conversation_id;
            end if;
            return refusal;
        end if;

        -- New ids only: an id already used (by anyone) is a unique violation, and the whole call changes nothing.
        insert into api.agent_messages (id, conversation_id, role, content)
        values (p_user_message_id, p_conversation_id, 'user', p_text);
        insert into api.agent_messages (id, conversation_id, role, content, metadata)
        values (p_assistant_message_id, p_conversation_id, 'assistant', '',
                jsonb_build_object('status', 'streaming', 'run_id', p_run_id, 'seq', 0));
        insert into api.agent_runs (id, user_id, conversation_id, user_message_id, assistant_message_id,
                                    client_message_id)
        values (p_run_id, uid, p_conversation_id, p_user_message_id, p_assistant_message_id, p_client_message_id)
        returning * into run;
        insert into canvalo_private.run_keys (run_id, key_hash) values (run.id, canvalo_private.key_hash(p_write_key));
    end if;

    -- The history: the newest p_history_limit messages, oldest first, ending with the user's message (the
    -- placeholder, written in the same instant after it, is left out).
    return jsonb_build_object('outcome', 'started', 'run', to_jsonb(run), 'history', coalesce((
        select jsonb_agg(to_jsonb(h) - 'words' order by h.created_at, h.seq)
          from (select m.* from api.agent_messages m
                 where m.conversation_id = run.conversation_id and m.id <> run.assistant_message_id
                 order by m.created_at desc, m.seq desc
                 limit p_history_limit) h), '[]'::jsonb));
end;
$$;

-- Store.flush_runs for one user (sqlite_runs.flush_runs): apply each update in order, each only to a run of the
-- caller's that is still running and whose write key it carries, then read back the controls of every run passed;
-- `gone` is a run missing, someone else's, or no longer running; `applied`, that its update was written. Events only
-- go forward: a batch at or before the last one stored (a retry of a flush whose answer was lost) is skipped. The
-- text goes to the run's own answer; a terminal status is written once, and takes no more writes after it.
create or replace function api.agent_runs_flush(p_updates jsonb)
returns jsonb
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
    u record;
    run api.agent_runs;
    stored integer;
    cut integer;
    tail text;
    applied uuid[] := '{}';
begin
    -- Bounds far above what the service sends (a worker's runs of one user, each a few hundred milliseconds of
    -- events) and far below what would make one call expensive.
    if jsonb_typeof(p_updates) is distinct from 'array' or jsonb_array_length(p_updates) > 100 then
        raise exception 'invalid flush' using errcode = '22023';
    end if;
    for u in
        select * from jsonb_to_recordset(p_updates) as x (
            run_id uuid, write_key text, first_seq integer, last_seq integer, frames text, content text,
            metadata jsonb, agent_type text, heartbeat boolean, final_status text)
    loop
        select r.* into run
          from api.agent_runs r join canvalo_private.run_keys k on k.run_id = r.id
         where r.id = u.run_id and r.user_id = uid and r.status = 'running'
           and k.key_hash = canvalo_private.key_hash(u.write_key)
           for update of r;
        if not found then
            -- This very end, already written (a retry after the first answer was lost), counts as written.
            if exists (select 1 from api.agent_runs r join canvalo_private.run_keys k on k.run_id = r.id
                        where r.id = u.run_id and r.user_id = uid and r.status = u.final_status
                          and r.last_seq = u.last_seq and k.key_hash = canvalo_private.key_hash(u.write_key)) then
                applied := applied || u.run_id;
            end if;
            continue;
        end if;
        applied := applied || run.id;
        if (u.final_status is not null and u.final_status not in ('complete', 'error', 'interrupted', 'stopped'))
           or u.last_seq > 10000000 or octet_length(u.frames) > 8388608 or char_length(u.content) > 2000000 then
            raise exception 'invalid run update' using errcode = '22023';
        end if;
        if u.frames is not null then
            -- Events only go forward, so the last stored is the one with the highest seq: one index probe.
            select coalesce((select e.last_seq from api.agent_run_events e where e.run_id = run.id
                              order by e.seq desc limit 1), 0) into stored;
            if u.first_seq <= stored + 1 and u.last_seq > stored and u.last_seq >= u.first_seq then
                if u.first_seq <= stored then
                    -- The batch re-sends events already stored (the flush that stored them lost its answer) and
                    -- adds new ones: keep the new ones. Every frame starts a line with "id: N", and a frame's data
                    -- is one JSON line, so the frame after `stored` starts right after its separator.
                    cut := strpos(u.frames, E'\n\nid: ' || (stored + 1) || E'\n');
                    tail := case when cut = 0 then null else substr(u.frames, cut + 2) end;
                else
                    tail := u.frames;
                end if;
                if tail is not null then
                    insert into api.agent_run_events (run_id, seq, last_seq, frames)
                    values (run.id, stored + 1, u.last_seq, tail);
                end if;
            end if;
        end if;
        if u.content is not null then
            -- The metadata names this run whatever the update says, so it can point nowhere else.
            update api.agent_messages m
               set content = u.content,
                   metadata = case when jsonb_typeof(u.metadata) = 'object' then u.metadata else '{}'::jsonb end
                              || jsonb_build_object('run_id', run.id),
                   agent_type = coalesce(u.agent_type, m.agent_type)
             where m.id = run.assistant_message_id and m.conversation_id = run.conversation_id
               and m.role = 'assistant';
        end if;
        if u.final_status is not null then
            update api.agent_runs r
               set status = u.final_status, ended_at = now(), heartbeat_at = now(),
                   last_seq = coalesce((select e.last_seq from api.agent_run_events e where e.run_id = r.id
                                         order by e.seq desc limit 1), 0)
             where r.id = run.id;
        elsif coalesce(u.heartbeat, false) then
            update api.agent_runs r set heartbeat_at = now() where r.id = run.id;
        end if;
    end loop;
    return coalesce((
        select jsonb_agg(jsonb_build_object(
                   'run_id', passed.run_id,
                   'stop', coalesce(r.stop_requested, false),
                   'seen_chars', r.stop_seen_chars,
                   'gone', r.status is distinct from 'running',
                   'deleted', r.id is null,
                   'applied', passed.run_id = any (applied)))
          from (select distinct x.run_id from jsonb_to_recordset(p_updates) as x (run_id uuid)) passed
          left join api.agent_runs r on r.id = passed.run_id and r.user_id = uid), '[]'::jsonb);
end;
$$;

-- Store.read_run (004's, unchanged but for leaving out the words column): the caller's run, its answer and, unless
-- p_after is null, the event batches holding events after p_after; null when the run is missing or someone else's.
-- SECURITY INVOKER: it only reads, under row-level security, and names the caller explicitly too.
create or replace function api.agent_run_read(p_run_id uuid, p_after integer default null)
returns jsonb
language sql
stable
set search_path = ''
as $$
    select jsonb_build_object(
        'run', to_jsonb(r),
        'message', to_jsonb(m) - 'words',
        'batches', case when p_after is null then '[]'::jsonb else coalesce((
            select jsonb_agg(jsonb_build_object('first_seq', e.seq, 'last_seq', e.last_seq, 'frames', e.frames)
                             order by e.seq)
              from api.agent_run_events e
             where e.run_id = r.id and e.last_seq > p_after), '[]'::jsonb) end)
      from api.agent_runs r
      join api.agent_messages m on m.id = r.assistant_message_id
     where r.id = p_run_id and r.user_id = auth.uid();
$$;

-- Store.request_stop: ask the worker generating the caller's run to stop it (it reads this at its next flush); a run
-- that has ended is left as it is. False when the run is missing or someone else's.
create or replace function api.agent_run_stop(p_run_id uuid, p_seen_chars integer default null)
returns boolean
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
begin
    if p_seen_chars < 0 then
        raise exception 'invalid seen_chars' using errcode = '22023';
    end if;
    if not exists (select 1 from api.agent_runs r where r.id = p_run_id and r.user_id = uid) then
        return false;
    end if;
    update api.agent_runs r
       set stop_requested = true, stop_seen_chars = p_seen_chars
     where r.id = p_run_id and r.user_id = uid and r.status = 'running';
    return true;
end;
$$;

-- -- pending actions ----------------------------------------------------------------------------------------------
-- 005's functions, now SECURITY DEFINER. An action is the caller's, on a record of the caller's, and an update names
-- only columns that users may update through the Data API (002's column grants): confirming it changes the record
-- exactly as its owner could by a direct request, and the owner's confirmation is what the model cannot give.

-- Whether users may update p_column of api.p_table (false for a column that does not exist).
create or replace function canvalo_private.updatable(p_table text, p_column text)
returns boolean
language sql
stable
set search_path = ''
as $$
    select case when exists (select 1 from pg_catalog.pg_attribute a
                              where a.attrelid = pg_catalog.to_regclass('api.' || pg_catalog.quote_ident(p_table))
                                and a.attname = p_column and a.attnum > 0 and not a.attisdropped)
                then pg_catalog.has_column_privilege('authenticated', 'api.' || pg_catalog.quote_ident(p_table),
                                                     p_column, 'UPDATE')
                else false end
$$;

-- Store.create_action (sqlite_actions.create_action): keep the caller's action for p_ttl_seconds, after deleting
-- their actions that expired over a day ago (kept that long so a late confirmation still says `expired`). A replay
-- (same p_id: the id is the service's) inserts nothing and returns the row; null when the id or the record is not
-- the caller's.
create or replace function api.pending_action_create(
    p_id uuid,
    p_table text,
    p_tool text,
    p_kind text,
    p_record_id uuid,
    p_changes jsonb,
    p_summary text,
    p_ttl_seconds double precision
)
returns jsonb
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
    action api.pending_actions;
    owned boolean;
begin
    if p_ttl_seconds is null or p_ttl_seconds <= 0 or p_ttl_seconds > 86400
       or char_length(p_summary) > 10000 or char_length(p_tool) > 100
       or p_table not in ('invoices', 'appointments', 'projects', 'proposals', 'contacts', 'reviews', 'campaigns',
                          'tasks', 'goals')
       or (p_kind = 'update' and (jsonb_typeof(p_changes) is distinct from 'object' or exists (
               select 1 from jsonb_object_keys(p_changes) k where not canvalo_private.updatable(p_table, k)))) then
        raise exception 'invalid pending action' using errcode = '22023';
    end if;
    select * into action from api.pending_actions a where a.id = p_id;
    if found then
        return case when action.user_id = uid then to_jsonb(action) end;
    end if;
    execute format('select exists (select 1 from api.%I t where t.id = $1 and t.user_id = $2)', p_table)
       into owned using p_record_id, uid;
    if not owned then
        return null;
    end if;
    if canvalo_private.over_write_ceiling(uid) is not null then
        raise exception 'too many writes' using errcode = '54000';
    end if;
    delete from api.pending_actions a where a.user_id = uid and a.expires_at < now() - interval '1 day';
    insert into api.pending_actions (id, user_id, table_name, tool, kind, record_id, changes, summary, expires_at)
    values (p_id, uid, p_table, p_tool, p_kind, p_record_id, p_changes, p_summary,
            now() + make_interval(secs => p_ttl_seconds))
    on conflict (id) do nothing;
    select * into action from api.pending_actions a where a.id = p_id and a.user_id = uid;
    if not found then
        return null;
    end if;
    return to_jsonb(action);
end;
$$;

-- Store.confirm_action (sqlite_actions.confirm_action): claim the caller's action (used_at set only while it is null
-- and unexpired; of two confirmations at once the second waits for the first's row lock, then finds it used) and run
-- its change in the same transaction, on the caller's record only. A change that finds no row (the record went)
-- raises no_data_found, which rolls back this block, claim included, so the action stays unused.
create or replace function api.pending_action_confirm(p_action_id uuid)
returns jsonb
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
    action api.pending_actions;
    assignments text;
    changed jsonb;
begin
    update api.pending_actions a
       set used_at = now()
     where a.id = p_action_id and a.user_id = uid and a.used_at is null and a.expires_at > now()
    returning * into action;
    if not found then
        select * into action from api.pending_actions a where a.id = p_action_id and a.user_id = uid;
        if not found then
            return jsonb_build_object('outcome', 'not_found');
        elsif action.used_at is not null then
            return jsonb_build_object('outcome', 'used');
        end if;
        return jsonb_build_object('outcome', 'expired');
    end if;

    if action.kind = 'delete' then
        execute format('delete from api.%I t where t.id = $1 and t.user_id = $2'
                       ' returning jsonb_build_object(''id'', t.id)', action.table_name)
           into changed using action.record_id, uid;
    else
        -- Checked again here: the grants may have narrowed since the action was kept.
        if exists (select 1 from jsonb_object_keys(action.changes) k
                    where not canvalo_private.updatable(action.table_name, k)) then
            raise exception 'invalid pending action' using errcode = '22023';
        end if;
        -- jsonb_populate_record casts each value to its column's type, as PostgREST does for a PATCH body.
        select string_agg(format('%I = r.%I', k, k), ', ') into assignments from jsonb_object_keys(action.changes) k;
        execute format('update api.%I t set %s from jsonb_populate_record(null::api.%I, $1) r'
                       ' where t.id = $2 and t.user_id = $3 returning to_jsonb(t)',
                       action.table_name, assignments, action.table_name)
           into changed using action.changes, action.record_id, uid;
    end if;
    if changed is null then
        raise exception 'record not found' using errcode = 'P0002';
    end if;
    return jsonb_build_object('outcome', 'done', 'action', to_jsonb(action),
                              'record', case when action.kind = 'update' then changed end);
exception when no_data_found then
    -- Variables keep their values through the rollback: `action` still names the table.
    return jsonb_build_object('outcome', 'record_not_found', 'table', action.table_name);
end;
$$;

-- -- search -------------------------------------------------------------------------------------------------------

-- The words of every title and message are kept beside the text (a stored generated column, filled by this
-- migration once) and indexed there. 006 indexed an expression instead, so any plan that did not use the index
-- parsed every candidate's text again: with 100,000 messages of one user's, a search took 10 s. Now no plan parses
-- text, and a word is found through its index.
alter table api.agent_messages add column if not exists words tsvector
    generated always as (canvalo_private.search_vector(content)) stored;
alter table api.agent_conversations add column if not exists words tsvector
    generated always as (canvalo_private.search_vector(title)) stored;
drop index if exists api.agent_messages_search_idx;
drop index if exists api.agent_conversations_search_idx;
create index if not exists agent_messages_words_idx on api.agent_messages using gin (words);
create index if not exists agent_conversations_words_idx on api.agent_conversations using gin (words);

-- The search for every term as a quoted prefix, all required ('kitch':* & 'inv':*): nothing in a term is read as
-- query syntax. 008_search_folding.sql replaces it, with the words column.
create or replace function canvalo_private.search_query(p_terms text[])
returns tsquery
language sql
stable
set search_path = ''
as $$
    select pg_catalog.to_tsquery('pg_catalog.simple',
                                 pg_catalog.string_agg(pg_catalog.quote_literal(t.term) || ':*', ' & '))
      from pg_catalog.unnest(p_terms) as t (term)
     where t.term <> ''
$$;

-- Store.list_conversations with a search (services/store/sqlite/listing.py is the reference): the caller's conversations
-- holding every term as a word prefix in their title or one of their messages, by last activity (updated_at
-- descending, then id), p_offset and p_limit of them, or those older than (p_before_at, p_before_id) or newer than
-- (p_after_at, p_after_id), nearest first: an `after` page comes newest-last and the service turns it round. `total`
-- counts every match, whatever the page.
create or replace function api.agent_conversations_search(
    p_terms text[],
    p_limit integer,
    p_offset integer default 0,
    p_before_at timestamptz default null,
    p_before_id uuid default null,
    p_after_at timestamptz default null,
    p_after_id uuid default null
)
returns jsonb
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
    query tsquery;
begin
    if p_limit is null or p_limit < 0 or p_offset is null or p_offset < 0 or cardinality(p_terms) > 32
       or (p_before_at is null) <> (p_before_id is null) or (p_after_at is null) <> (p_after_id is null) then
        raise exception 'invalid search page' using errcode = '22023';
    end if;
    query := canvalo_private.search_query(p_terms);
    if query is null or pg_catalog.numnode(query) = 0 then
        return pg_catalog.jsonb_build_object('total', 0, 'rows', '[]'::jsonb);
    end if;
    return (
        with matched as (
            select c.id from api.agent_conversations c where c.user_id = uid and c.words @@ query
            union
            select m.conversation_id
              from api.agent_messages m join api.agent_conversations c on c.id = m.conversation_id
             where c.user_id = uid and m.words @@ query
        ),
        hits as (
            -- Every column but the search words: a conversation reads as the table's select does (012 added one).
            select c.*
              from api.agent_conversations c
             where c.id in (select matched.id from matched) and c.user_id = uid
        ),
        ordered as (
            select h.*, pg_catalog.row_number() over (
                       order by case when p_after_at is null then h.updated_at end desc,
                                case when p_after_at is null then h.id end,
                                h.updated_at, h.id desc) as n
              from hits h
             where (p_before_at is null or h.updated_at < p_before_at
                    or (h.updated_at = p_before_at and h.id > p_before_id))
               and (p_after_at is null or h.updated_at > p_after_at
                    or (h.updated_at = p_after_at and h.id < p_after_id))
        )
        select pg_catalog.jsonb_build_object(
            'total', (select pg_catalog.count(*) from hits),
            'rows', coalesce((select pg_catalog.jsonb_agg(pg_catalog.to_jsonb(o) - 'n' - 'words' order by o.n)
                                from ordered o
                               where o.n > p_offset and o.n <= p_offset + p_limit), '[]'::jsonb))
    );
end;
$$;

-- -- grants: every function above to `authenticated` only ---------------------------------------------------------

revoke all on function api.agent_conversation_create(uuid, text) from public, anon;
revoke all on function api.agent_conversation_rename(uuid, text) from public, anon;
revoke all on function api.agent_conversation_delete(uuid) from public, anon;
revoke all on function api.agent_runs_maintain(double precision, double precision) from public, anon;
revoke all on function api.agent_run_begin(uuid, uuid, text, text, uuid, uuid, double precision, double precision,
                                           integer, integer, text, uuid, integer, integer) from public, anon;
revoke all on function api.agent_runs_flush(jsonb) from public, anon;
revoke all on function api.agent_run_stop(uuid, integer) from public, anon;
revoke all on function api.pending_action_create(uuid, text, text, text, uuid, jsonb, text, double precision)
    from public, anon;
revoke all on function api.pending_action_confirm(uuid) from public, anon;
revoke all on function api.agent_conversations_search(text[], integer, integer, timestamptz, uuid, timestamptz, uuid)
    from public, anon;
grant execute on function api.agent_conversation_create(uuid, text) to authenticated;
grant execute on function api.agent_conversation_rename(uuid, text) to authenticated;
grant execute on function api.agent_conversation_delete(uuid) to authenticated;
grant execute on function api.agent_runs_maintain(double precision, double precision) to authenticated;
grant execute on function api.agent_run_begin(uuid, uuid, text, text, uuid, uuid, double precision, double precision,
                                              integer, integer, text, uuid, integer, integer) to authenticated;
grant execute on function api.agent_runs_flush(jsonb) to authenticated;
grant execute on function api.agent_run_stop(uuid, integer) to authenticated;
grant execute on function api.pending_action_create(uuid, text, text, text, uuid, jsonb, text, double precision)
    to authenticated;
grant execute on function api.pending_action_confirm(uuid) to authenticated;
grant execute on function api.agent_conversations_search(text[], integer, integer, timestamptz, uuid, timestamptz,
                                                         uuid) to authenticated;

select canvalo_private.lock_chat_writes();

-- A deployment that has applied 010 keeps its pending-action functions when this file runs again: the versions this
-- file brings back stay closed (010_confirm_every_change.sql).
do $$
begin
    if pg_catalog.to_regprocedure('canvalo_private.lock_pending_actions()') is not null then
        perform canvalo_private.lock_pending_actions();
    end if;
    -- And one that has applied 012 keeps its agent_run_begin alone (012_branches.sql).
    if pg_catalog.to_regprocedure('canvalo_private.lock_branches()') is not null then
        perform canvalo_private.lock_branches();
    end if;
end;
$$;

commit;

-- Tell PostgREST to reload its schema cache so the new and changed functions are visible at once.
notify pgrst, 'reload schema';
