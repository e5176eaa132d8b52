-- Canvalo chat: the usage ledger (a row per model call), budgets checked when a turn is admitted, and the caller's
-- usage read back.
--
-- Apply after 001-012 (`for f in migrations/*.sql; ...`, README); safe to run more than once. Deploy it together with
-- this version of the service, which begins turns and flushes runs through the functions below. It redefines 012's
-- agent_run_begin and 009's agent_runs_flush: an earlier migration run again alone after this one brings its own
-- version back, so run this one again after it (running them all in order, as README says, does).
--
-- * api.agent_usage: one row per model call of a run (the supervisor's, each specialist's), with the run's user and
--   conversation ids, the model, the four token counts, the cost in USD (null: the model has no price) and whether
--   the figures are estimated (a call cut short). No foreign key to the conversation or the run: deleting a
--   conversation (which deletes its runs) must not refund what it cost. Unique by (run_id, call_index), so a flush
--   sent again inserts nothing twice. A user reads their own rows (row-level security); nobody writes them but the
--   checked function below (no insert, update or delete grant to anyone).
-- * agent_runs_flush (009's rules, unchanged, and its anon grant) takes each update's `calls` and inserts them under
--   the run's own user and conversation, in the same transaction as the run's events: the ledger is as durable as
--   the answer, and costs no request of its own.
-- * agent_runs.reserved_tokens / reserved_cost: what a turn reserved against the budgets when it was admitted. While
--   its run runs, the part its calls have not used yet counts as used; once it ends (a flushed end, or the reaper's
--   `interrupted`) it counts no more: that is the reconciliation, and how a dead worker's reservation is released.
-- * agent_run_begin (012's checks, unchanged) takes p_budget: null (budgets off: no extra work) or the caller's
--   limits, each with its period's start, and this turn's reservation. It is checked beside the chat limits, under
--   the same per-user lock, so of two turns at a budget's edge one is admitted. 012's overload is dropped (two would
--   make PostgREST's resolution by name ambiguous, PGRST203).
-- * api.agent_usage_report: the caller's usage since a time, by model and by conversation, and their live
--   reservations (GET /api/usage).

begin;

create table if not exists api.agent_usage (
    run_id uuid not null,
    call_index integer not null check (call_index between 0 and 999),
    user_id uuid not null,
    conversation_id uuid not null,
    agent_type text not null,
    model_id text not null,
    input_tokens bigint not null check (input_tokens >= 0),
    output_tokens bigint not null check (output_tokens >= 0),
    cache_read_tokens bigint not null check (cache_read_tokens >= 0),
    cache_write_tokens bigint not null check (cache_write_tokens >= 0),
    cost numeric check (cost >= 0),
    estimated boolean not null default false,
    created_at timestamptz not null default now(),
    primary key (run_id, call_index)
);
create index if not exists agent_usage_user_time_idx on api.agent_usage (user_id, created_at);

alter table api.agent_usage enable row level security;
drop policy if exists agent_usage_select_own on api.agent_usage;
create policy agent_usage_select_own on api.agent_usage for select to authenticated using (user_id = auth.uid());
revoke all on api.agent_usage from public, anon, authenticated;
grant select on api.agent_usage to authenticated;

alter table api.agent_runs add column if not exists reserved_tokens bigint not null default 0;
alter table api.agent_runs add column if not exists reserved_cost numeric not null default 0;

-- What a user's running runs hold reserved beyond what their calls have used: (tokens, USD).
create or replace function canvalo_private.usage_reserved(p_user uuid, out tokens numeric, out cost numeric)
language plpgsql
stable
set search_path = ''
as $$
begin
    select coalesce(sum(greatest(0, r.reserved_tokens - coalesce(u.tokens, 0))), 0),
           coalesce(sum(greatest(0, r.reserved_cost - coalesce(u.cost, 0))), 0)
      into tokens, cost
      from api.agent_runs r
      left join lateral (
          select sum(x.input_tokens + x.output_tokens + x.cache_read_tokens + x.cache_write_tokens) as tokens,
                 sum(x.cost) as cost
            from api.agent_usage x where x.run_id = r.id) u on true
     where r.user_id = p_user and r.status = 'running';
end;
$$;

-- The first budget of p_budget that this turn's reservation would pass, as agent_run_begin's refusal; else null.
create or replace function canvalo_private.budget_refusal(p_user uuid, p_budget jsonb)
returns jsonb
language plpgsql
stable
set search_path = ''
as $$
declare
    lim record;
    reserved record;
    spent numeric;
    reserve numeric;
begin
    select * into reserved from canvalo_private.usage_reserved(p_user);
    for lim in
        select * from jsonb_to_recordset(p_budget -> 'limits') as x (period text, unit text, "limit" numeric,
                                                                       since double precision)
    loop
        select coalesce(sum(case when lim.unit = 'tokens'
                                 then u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_write_tokens
                                 else coalesce(u.cost, 0) end), 0)
          into spent
          from api.agent_usage u where u.user_id = p_user and u.created_at >= to_timestamp(lim.since);
        spent := spent + case when lim.unit = 'tokens' then reserved.tokens else reserved.cost end;
        reserve := case when lim.unit = 'tokens' then (p_budget ->> 'reserve_tokens')::numeric
                        else (p_budget ->> 'reserve_cost')::numeric end;
        if spent + reserve > lim."limit" then
            return jsonb_build_object('outcome', 'budget_exceeded', 'period', lim.period, 'unit', lim.unit,
                                      'limit', lim."limit", 'used', spent);
        end if;
    end loop;
    return null;
end;
$$;

drop function if exists api.agent_run_begin(uuid, uuid, text, text, uuid, uuid, double precision, double precision,
                                            integer, integer, text, uuid, integer, integer, uuid, uuid, uuid);

-- Store.begin_run (sqlite_runs.begin_run): 012's order and checks, the budgets beside the chat limits.
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
    p_stream_limit integer default null,
    p_parent_message_id uuid default null,
    p_edit_message_id uuid default null,
    p_regenerate_message_id uuid default null,
    p_budget jsonb default null
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
    named api.agent_messages;
    parent uuid;
    answered uuid;
    history uuid[];
begin
    if p_history_limit is null or p_history_limit < 0 or char_length(p_write_key) is distinct from 64
       or (p_regenerate_message_id is null and (p_text is null or char_length(p_text) not between 1 and 10000))
       or char_length(p_text) > 10000 or char_length(p_title) > 200
       or p_user_message_id is not distinct from p_assistant_message_id
       or num_nonnulls(p_parent_message_id, p_edit_message_id, p_regenerate_message_id) > 1
       or (p_budget is not null and (jsonb_typeof(p_budget -> 'limits') is distinct from 'array'
           or jsonb_array_length(p_budget -> 'limits') > 4
           or exists (select 1 from jsonb_array_elements(p_budget -> 'limits') l
                       where l ->> 'period' is distinct from 'day' and l ->> 'period' is distinct from 'month'
                          or l ->> 'unit' is distinct from 'tokens' and l ->> 'unit' is distinct from 'cost'
                          or jsonb_typeof(l -> 'limit') is distinct from 'number'
                          or jsonb_typeof(l -> 'since') is distinct from 'number')
           or coalesce((p_budget ->> 'reserve_tokens')::bigint, -1) < 0
           or coalesce((p_budget ->> 'reserve_cost')::numeric, -1) < 0)) then
        raise exception 'invalid chat turn' using errcode = '22023';
    end if;
    perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('canvalo.agent_runs:' || uid::text, 0));

    select * into run from api.agent_runs r where r.id = p_run_id and r.user_id = uid;
    if found then
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
                -- A regenerate's repeat is the same when it answers the same user message again.
                return jsonb_build_object(
                    'outcome', case when run.conversation_id = p_conversation_id and (
                                         (p_regenerate_message_id is null and earlier_text is not distinct from p_text)
                                         or run.user_message_id = (select m.parent_id from api.agent_messages m
                                             where m.id = p_regenerate_message_id
                                               and m.conversation_id = p_conversation_id))
                                    then 'existing' else 'conflict' end,
                    'run', to_jsonb(run));
            end if;
        end if;

        retry_seconds := canvalo_private.over_write_ceiling(uid);
        if retry_seconds is not null then
            return jsonb_build_object('outcome', 'rate_limited', 'retry_after', retry_seconds);
        end if;

        perform api.agent_runs_maintain(p_stale_seconds, p_events_ttl);

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

        -- The branch: a message named must be in this conversation (so the caller's) and of the right role.
        if num_nonnulls(p_parent_message_id, p_edit_message_id, p_regenerate_message_id) = 1 then
            select * into named from api.agent_messages m
             where m.id = coalesce(p_parent_message_id, p_edit_message_id, p_regenerate_message_id)
               and m.conversation_id = p_conversation_id;
            if not found then
                refusal := jsonb_build_object('outcome', 'message_not_found');
            elsif (named.role = 'user') = (p_edit_message_id is null)
                  or (p_regenerate_message_id is not null and not exists (
                      select 1 from api.agent_messages u where u.id = named.parent_id and u.role = 'user')) then
                refusal := jsonb_build_object('outcome', 'wrong_role');
            elsif p_parent_message_id is not null then
                parent := named.id;
            elsif p_edit_message_id is not null then
                parent := named.parent_id;
            else
                answered := named.parent_id;
            end if;
        else
            select c.active_leaf_id into parent from api.agent_conversations c where c.id = p_conversation_id;
        end if;

        if refusal is null and p_chat_limit is not null then
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
                retry_seconds := greatest(0, extract(epoch from oldest - now()) + p_stale_seconds);
                refusal := jsonb_build_object('outcome', 'streams_full', 'retry_after', retry_seconds);
            end if;
        end if;
        if refusal is null and p_budget is not null then
            refusal := canvalo_private.budget_refusal(uid, p_budget);
        end if;
        if refusal is not null then
            if created then
                delete from api.agent_conversations c where c.id = p_conversation_id;
            end if;
            return refusal;
        end if;

        if answered is null then
            insert into api.agent_messages (id, conversation_id, role, content, parent_id)
            values (p_user_message_id, p_conversation_id, 'user', p_text, parent);
            answered := p_user_message_id;
        end if;
        select coalesce(array_agg(p.id order by p.depth desc), '{}') into history
          from canvalo_private.path_to(p_conversation_id, answered) p where p.depth <= p_history_limit;
        insert into api.agent_messages (id, conversation_id, role, content, metadata, parent_id)
        values (p_assistant_message_id, p_conversation_id, 'assistant', '',
                jsonb_build_object('status', 'streaming', 'run_id', p_run_id, 'seq', 0), answered);
        update api.agent_conversations c set active_leaf_id = p_assistant_message_id where c.id = p_conversation_id;
        insert into api.agent_runs (id, user_id, conversation_id, user_message_id, assistant_message_id,
                                    client_message_id, prompt_message_ids, reserved_tokens, reserved_cost)
        values (p_run_id, uid, p_conversation_id, answered, p_assistant_message_id, p_client_message_id, history,
                coalesce((p_budget ->> 'reserve_tokens')::bigint, 0), coalesce((p_budget ->> 'reserve_cost')::numeric, 0))
        returning * into run;
        insert into canvalo_private.run_keys (run_id, key_hash) values (run.id, canvalo_private.key_hash(p_write_key));
    end if;

    -- The history: the messages the run's prompt was built from (its path), oldest first.
    return jsonb_build_object('outcome', 'started', 'run',
                              to_jsonb(run) - 'prompt_message_ids' - 'reserved_tokens' - 'reserved_cost', 'history', coalesce((
        select jsonb_agg(to_jsonb(m) - 'words' order by h.n)
          from unnest(run.prompt_message_ids) with ordinality as h (id, n)
          join api.agent_messages m on m.id = h.id), '[]'::jsonb));
end;
$$;

-- Store.flush_runs: 009's rules (see 007's header for what each update may do), and the calls into the ledger.
create or replace function api.agent_runs_flush(p_updates jsonb)
returns jsonb
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    u record;
    run api.agent_runs;
    stored integer;
    cut integer;
    tail text;
    applied uuid[] := '{}';
    verified uuid[] := '{}';
begin
    -- Bounds: as many runs as the service sends in one call (services/store/postgrest/store.py, FLUSH_BATCH), each a few hundred
    -- milliseconds of events; far below what would make one call expensive.
    if jsonb_typeof(p_updates) is distinct from 'array' or jsonb_array_length(p_updates) > 500 then
        raise exception 'invalid flush' using errcode = '22023';
    end if;
    for u in
        select * from jsonb_to_recordset(p_updates) as x (
            run_id uuid, write_key text, first_seq integer, last_seq integer, frames text, content text,
            metadata jsonb, agent_type text, heartbeat boolean, final_status text, calls jsonb)
    loop
        -- The write key is the authority: whoever holds it may write this run, as its user, and nothing else.
        select r.* into run
          from api.agent_runs r join canvalo_private.run_keys k on k.run_id = r.id
         where r.id = u.run_id and k.key_hash = canvalo_private.key_hash(u.write_key)
           for update of r;
        if not found then
            continue;  -- no such run, or not this key: reported as gone, saying nothing of any run
        end if;
        verified := verified || run.id;
        if run.status <> 'running' then
            -- This very end, already written (a retry after the first answer was lost), counts as written.
            if run.status = u.final_status and run.last_seq = u.last_seq then
                applied := applied || run.id;
            end if;
            continue;
        end if;
        if (u.final_status is not null and u.final_status not in ('complete', 'error', 'interrupted', 'stopped'))
           or u.last_seq > 10000000 or octet_length(u.frames) > 8388608 or char_length(u.content) > 2000000
           or (u.calls is not null and (jsonb_typeof(u.calls) <> 'array' or jsonb_array_length(u.calls) > 1000)) then
            continue;  -- not applied: one call carries many users' runs, so one bad update must not fail the rest
        end if;
        applied := applied || run.id;
        if u.calls is not null then
            -- The ledger: under the run's own user and conversation, once per (run, call index).
            insert into api.agent_usage (run_id, call_index, user_id, conversation_id, agent_type, model_id,
                                         input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost,
                                         estimated)
            select run.id, c.call_index, run.user_id, run.conversation_id, c.agent_type, c.model_id,
                   c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens, c.cost,
                   coalesce(c.estimated, false)
              from jsonb_to_recordset(u.calls) as c (
                       call_index integer, agent_type text, model_id text, input_tokens bigint, output_tokens bigint,
                       cache_read_tokens bigint, cache_write_tokens bigint, cost numeric, estimated boolean)
             where c.call_index between 0 and 999 and char_length(c.agent_type) between 1 and 64
               and char_length(c.model_id) between 1 and 2048
               and least(c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens) >= 0
               and greatest(c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens) < 100000000
               and (c.cost is null or c.cost between 0 and 1000000)
            on conflict (run_id, call_index) do nothing;
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
          left join api.agent_runs r on r.id = passed.run_id and r.id = any (verified)), '[]'::jsonb);
end;
$$;

-- Store.usage_report: the caller's ledger since p_since, by model and by conversation, and their live reservations.
create or replace function api.agent_usage_report(p_since timestamptz)
returns jsonb
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
    reserved record;
begin
    if p_since is null then
        raise exception 'invalid usage period' using errcode = '22023';
    end if;
    select * into reserved from canvalo_private.usage_reserved(uid);
    return jsonb_build_object(
        'by_model', coalesce((
            select jsonb_agg(to_jsonb(m) order by m.model_id) from (
                select u.model_id, count(*) as calls, count(*) filter (where u.estimated) as estimated_calls,
                       sum(u.input_tokens) as input_tokens,
                       sum(u.output_tokens) as output_tokens, sum(u.cache_read_tokens) as cache_read_tokens,
                       sum(u.cache_write_tokens) as cache_write_tokens, sum(u.cost) as cost
                  from api.agent_usage u where u.user_id = uid and u.created_at >= p_since
                 group by u.model_id) m), '[]'::jsonb),
        'by_conversation', coalesce((
            select jsonb_agg(to_jsonb(c) order by c.tokens desc, c.conversation_id) from (
                select u.conversation_id, count(*) as calls,
                       sum(u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_write_tokens) as tokens,
                       sum(u.cost) as cost
                  from api.agent_usage u where u.user_id = uid and u.created_at >= p_since
                 group by u.conversation_id) c), '[]'::jsonb),
        'reserved_tokens', reserved.tokens,
        'reserved_cost', reserved.cost);
end;
$$;

-- 007 run again calls this (as 012 made it) to drop the agent_run_begin overloads it would bring back: now 012's too.
create or replace function canvalo_private.lock_branches()
returns void
language plpgsql
set search_path = ''
as $$
begin
    drop function if exists api.agent_run_begin(uuid, uuid, text, text, uuid, uuid, double precision,
                                                double precision, integer, integer, text, uuid, integer, integer);
    drop function if exists api.agent_run_begin(uuid, uuid, text, text, uuid, uuid, double precision,
                                                double precision, integer, integer, text, uuid, integer, integer,
                                                uuid, uuid, uuid);
end;
$$;

revoke all on function canvalo_private.usage_reserved(uuid) from public, anon, authenticated;
revoke all on function canvalo_private.budget_refusal(uuid, jsonb) from public, anon, authenticated;
revoke all on function api.agent_run_begin(uuid, uuid, text, text, uuid, uuid, double precision, double precision,
                                           integer, integer, text, uuid, integer, integer, uuid, uuid, uuid, jsonb)
    from public, anon;
revoke all on function api.agent_usage_report(timestamptz) from public, anon;
grant execute on function api.agent_run_begin(uuid, uuid, text, text, uuid, uuid, double precision,
                                              double precision, integer, integer, text, uuid, integer, integer, uuid,
                                              uuid, uuid, jsonb) to authenticated;
grant execute on function api.agent_usage_report(timestamptz) to authenticated;
-- 009's: the flush, by its write keys alone, is the one function anon reaches.
revoke all on function api.agent_runs_flush(jsonb) from public;
grant execute on function api.agent_runs_flush(jsonb) to anon, authenticated;

select canvalo_private.lock_chat_writes();

commit;

notify pgrst, 'reload schema';
