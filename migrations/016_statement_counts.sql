-- Canvalo chat: beginning a turn costs PostgreSQL less: its two messages are one insert, counted once, and its
-- answer's history is read with its path.
--
-- Apply after 001-015 (`for f in migrations/*.sql; ...`, README); safe to run more than once. Deploy it with this
-- version of the service, or any since 013: agent_run_begin's arguments, checks and answer are 015's. 007, 012, 013 or
-- 015 run again alone after this one bring back their own agent_run_begin (the same rules, more statements), and 001
-- its per-row trigger (counting once still: see the function below); run this one again after any of them (running
-- them all in order, as README says, does).
--
-- With 500 turns at once the begins are what PostgreSQL spends the first seconds on (bench/RESULTS.md). 015's begin
-- wrote its conversation's row once per message it inserted (001's per-row trigger) and once more for the active leaf:
-- each a new row version, with `words` computed again (the table has a BEFORE UPDATE trigger, so PostgreSQL recomputes
-- its stored generated columns on every update), three index entries and the foreign-key check of a row this
-- transaction wrote. Now:
-- * The message counter is kept per statement (AFTER INSERT / AFTER DELETE ... FOR EACH STATEMENT, with the
--   statement's rows as a transition table): one update per conversation a statement touched, to the figures the
--   per-row trigger reached one row at a time: message_count plus the rows inserted, or minus the rows deleted and
--   never below 0; last_message_at and updated_at the greatest of their value and the inserted rows' created_at.
--   A conversation deleted takes its messages with it, and their statement finds no conversation to update, as the
--   per-row trigger found none.
-- * agent_run_begin inserts the user's message and its answer in one statement (the answer's parent is the user's
--   message, inserted first), then reads the history: the path to the user's message, as before. Its conversation's
--   row is written twice (counted, then its leaf), where it was three times.
-- * The answer's history is read by the statement that finds that path, each message by its key. 015 read it again
--   at the end, from the run's ids joined to agent_messages, with the plan PostgreSQL keeps from a session's first
--   calls: while the table was small, a scan of all of it, on every begin after, as it grew. A begin run again with
--   its write key (a retry) answers from its run's ids as before.
-- The active leaf is still moved by begin's own update: moved in the counting update instead (the last message a
-- statement inserts), it saved under 0.05 ms a begin and would have put a rule of begin's in a trigger.
-- Measured with bench/pg_turn_cost.py 300 2, serial, six runs interleaved with 015's on a busy 2-core machine
-- (pg_stat_statements, agent_run_begin): 1.27-1.55 ms a begin with 015's (median 1.44), 1.01-1.17 ms with this
-- (median 1.15).

begin;

-- 001's function, by name, now for the statement-level triggers below, conversations taken in order of their ids. 001
-- run again alone puts its per-row body back under this name, and its per-row trigger back: the statement-level
-- triggers then run that body with no row (NEW and OLD are null at statement level) and change nothing, so no message
-- is counted twice.
create or replace function api.agent_messages_touch_conversation()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
    touched record;
begin
    if tg_op = 'INSERT' then
        for touched in
            select a.conversation_id, count(*) as added, max(a.created_at) as newest
              from added a group by a.conversation_id order by a.conversation_id
        loop
            update api.agent_conversations c
               set message_count = c.message_count + touched.added,
                   last_message_at = greatest(c.last_message_at, touched.newest),
                   updated_at = greatest(c.updated_at, touched.newest)
             where c.id = touched.conversation_id;
        end loop;
    else
        for touched in
            select r.conversation_id, count(*) as removed
              from removed r group by r.conversation_id order by r.conversation_id
        loop
            update api.agent_conversations c
               set message_count = greatest(c.message_count - touched.removed, 0)
             where c.id = touched.conversation_id;
        end loop;
    end if;
    return null;
end;
$$;

revoke all on function api.agent_messages_touch_conversation() from public, anon, authenticated;

drop trigger if exists agent_messages_touch_conversation on api.agent_messages;
drop trigger if exists agent_messages_touch_conversation_insert on api.agent_messages;
drop trigger if exists agent_messages_touch_conversation_delete on api.agent_messages;
create trigger agent_messages_touch_conversation_insert
    after insert on api.agent_messages referencing new table as added
    for each statement execute function api.agent_messages_touch_conversation();
create trigger agent_messages_touch_conversation_delete
    after delete on api.agent_messages referencing old table as removed
    for each statement execute function api.agent_messages_touch_conversation();

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
    history_rows jsonb;
    leaf uuid;
begin
    -- agent_runs_maintain's own argument checks, made here since it is now called only when there is work for it.
    if p_stale_seconds is null or p_stale_seconds <= 0 or p_events_ttl is null or p_events_ttl < 0
       or p_history_limit is null or p_history_limit < 0 or char_length(p_write_key) is distinct from 64
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
        -- The same turn begun again: its run's history, the messages its prompt was built from, oldest first.
        history_rows := coalesce((
            select jsonb_agg(to_jsonb(m) - 'words' order by h.n)
              from unnest(run.prompt_message_ids) with ordinality as h (id, n)
              join api.agent_messages m on m.id = h.id), '[]'::jsonb);
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

        -- The caller's runs are maintained (dead ones end, expired events go) when some run needs it: the two
        -- conditions agent_runs_maintain acts on, each read from its own partial index (004).
        if exists (select 1 from api.agent_runs r where r.user_id = uid and r.status = 'running'
                      and r.heartbeat_at < now() - make_interval(secs => p_stale_seconds))
           or exists (select 1 from api.agent_runs r where r.user_id = uid and r.ended_at is not null
                      and not r.events_purged and r.ended_at < now() - make_interval(secs => p_events_ttl)) then
            perform api.agent_runs_maintain(p_stale_seconds, p_events_ttl);
        end if;

        -- One read for both: is the conversation the caller's, and which leaf a new message follows.
        select c.active_leaf_id into leaf from api.agent_conversations c where c.id = p_conversation_id and c.user_id = uid;
        if not found then
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
            parent := leaf;
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

        -- The user's message and its answer in one statement (the answer follows it), or the answer alone.
        if answered is null then
            insert into api.agent_messages (id, conversation_id, role, content, metadata, parent_id)
            values (p_user_message_id, p_conversation_id, 'user', p_text, default, parent),
                   (p_assistant_message_id, p_conversation_id, 'assistant', '',
                    jsonb_build_object('status', 'streaming', 'run_id', p_run_id, 'seq', 0), p_user_message_id);
            answered := p_user_message_id;
        else
            insert into api.agent_messages (id, conversation_id, role, content, metadata, parent_id)
            values (p_assistant_message_id, p_conversation_id, 'assistant', '',
                    jsonb_build_object('status', 'streaming', 'run_id', p_run_id, 'seq', 0), answered);
        end if;
        update api.agent_conversations c set active_leaf_id = p_assistant_message_id where c.id = p_conversation_id;
        -- The history, the path to the user's message, oldest first: its ids for the run, its messages for the answer
        -- (each read by its key, whatever the plan PostgreSQL keeps for this statement).
        select coalesce(array_agg(p.id order by p.depth desc), '{}'),
               coalesce(jsonb_agg((select to_jsonb(m) - 'words' from api.agent_messages m where m.id = p.id)
                                  order by p.depth desc), '[]'::jsonb)
          into history, history_rows
          from canvalo_private.path_to(p_conversation_id, answered) p where p.depth <= p_history_limit;
        insert into api.agent_runs (id, user_id, conversation_id, user_message_id, assistant_message_id,
                                    client_message_id, prompt_message_ids, reserved_tokens, reserved_cost)
        values (p_run_id, uid, p_conversation_id, answered, p_assistant_message_id, p_client_message_id, history,
                coalesce((p_budget ->> 'reserve_tokens')::bigint, 0), coalesce((p_budget ->> 'reserve_cost')::numeric, 0))
        returning * into run;
        insert into canvalo_private.run_keys (run_id, key_hash) values (run.id, canvalo_private.key_hash(p_write_key));
    end if;

    -- The history: the messages the run's prompt was built from (its path), oldest first.
    return jsonb_build_object('outcome', 'started', 'run',
                              to_jsonb(run) - 'prompt_message_ids' - 'reserved_tokens' - 'reserved_cost',
                              'history', history_rows);
end;
$$;

commit;
