-- Canvalo chat: a conversation is a tree of messages. Edit and regenerate add branches; nothing is overwritten.
--
-- Apply after 001-011 (`for f in migrations/*.sql; ...`, README); safe to run more than once. Deploy it together with
-- this version of the service, which begins every turn through the new agent_run_begin.
--
-- * agent_messages.parent_id: the message a message follows (null for a first message). agent_conversations.
--   active_leaf_id: the end of the branch the user is on, stored, moved by every turn and by
--   agent_conversation_set_leaf. agent_runs.prompt_message_ids: the path the run's prompt was built from.
-- * Existing conversations (those without an active leaf yet) become one branch: each message's parent is the one
--   before it by (created_at, seq), the active leaf the last one. A conversation that has a leaf is left alone, so a
--   second run of this file changes nothing.
-- * agent_run_begin (007's checks, unchanged) takes where the turn goes: p_parent_message_id (after this answer),
--   p_edit_message_id (beside this user message) or p_regenerate_message_id (beside this answer, without a new user
--   message), each checked to be in the caller's conversation, of the right role. Its history is the path from the
--   first message to the user's message. 007's overload is dropped: two would make PostgREST's by-name resolution
--   ambiguous (PGRST203).
-- * agent_message_branch reads a page of one branch, as the caller (row-level security applies), with each message's
--   siblings; agent_conversation_set_leaf switches branches. Both are SECURITY DEFINER with explicit owner checks, as
--   every function of 007.

begin;

alter table api.agent_messages add column if not exists parent_id uuid;
alter table api.agent_conversations add column if not exists active_leaf_id uuid;
alter table api.agent_runs add column if not exists prompt_message_ids uuid[] not null default '{}';
create index if not exists agent_messages_parent_idx on api.agent_messages (parent_id, created_at, seq);

update api.agent_messages m
   set parent_id = linear.previous
  from (select x.id, lag(x.id) over (partition by x.conversation_id order by x.created_at, x.seq) as previous
          from api.agent_messages x
          join api.agent_conversations c on c.id = x.conversation_id and c.active_leaf_id is null) linear
 where m.id = linear.id and linear.previous is not null;
update api.agent_conversations c
   set active_leaf_id = (select m.id from api.agent_messages m where m.conversation_id = c.id
                          order by m.created_at desc, m.seq desc limit 1)
 where c.active_leaf_id is null;

-- The newest leaf below a message of a conversation (the message itself when it has no children), following the
-- newest child at each step; null when the message is not in the conversation.
create or replace function canvalo_private.leaf_below(p_conversation_id uuid, p_message_id uuid)
returns uuid
language plpgsql
stable
set search_path = ''
as $$
begin
    -- PL/pgSQL, like 011's search words: PostgreSQL plans it once per session, where an SQL function with its own
    -- search_path is planned again on every call (this one runs in every turn and every branch read).
    return (
        with recursive down as (
            select m.id, 0 as depth from api.agent_messages m
             where m.id = p_message_id and m.conversation_id = p_conversation_id
            union all
            select c.id, d.depth + 1 from down d
             cross join lateral (select x.id from api.agent_messages x where x.parent_id = d.id
                                  order by x.created_at desc, x.seq desc limit 1) c
        )
        select down.id from down order by down.depth desc limit 1);
end;
$$;

-- The path from a message up to its conversation's first message, nearest first (depth 1 is the message).
create or replace function canvalo_private.path_to(p_conversation_id uuid, p_message_id uuid)
returns table (id uuid, depth integer)
language plpgsql
stable
set search_path = ''
as $$
begin
    -- PL/pgSQL for the reason leaf_below is.
    return query
        with recursive path as (
            select m.id, m.parent_id, 1 as depth from api.agent_messages m
             where m.id = p_message_id and m.conversation_id = p_conversation_id
            union all
            select m.id, m.parent_id, p.depth + 1 from api.agent_messages m join path p on m.id = p.parent_id
             where m.conversation_id = p_conversation_id
        )
        select path.id, path.depth from path;
end;
$$;

drop function if exists api.agent_run_begin(uuid, uuid, text, text, uuid, uuid, double precision, double precision,
                                            integer, integer, text, uuid, integer, integer);

-- Store.begin_run (sqlite_runs.begin_run): 007's order and checks, and the branch checked after `in_progress`.
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
    p_regenerate_message_id uuid default null
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
       or num_nonnulls(p_parent_message_id, p_edit_message_id, p_regenerate_message_id) > 1 then
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
                                    client_message_id, prompt_message_ids)
        values (p_run_id, uid, p_conversation_id, answered, p_assistant_message_id, p_client_message_id, history)
        returning * into run;
        insert into canvalo_private.run_keys (run_id, key_hash) values (run.id, canvalo_private.key_hash(p_write_key));
    end if;

    -- The history: the messages the run's prompt was built from (its path), oldest first.
    return jsonb_build_object('outcome', 'started', 'run', to_jsonb(run) - 'prompt_message_ids', 'history', coalesce((
        select jsonb_agg(to_jsonb(m) - 'words' order by h.n)
          from unnest(run.prompt_message_ids) with ordinality as h (id, n)
          join api.agent_messages m on m.id = h.id), '[]'::jsonb));
end;
$$;

-- Store.set_active_leaf: the caller's conversation switched to the newest leaf below one of its messages.
create or replace function api.agent_conversation_set_leaf(p_id uuid, p_message_id uuid)
returns jsonb
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
    leaf uuid;
    conversation api.agent_conversations;
begin
    if not exists (select 1 from api.agent_conversations c where c.id = p_id and c.user_id = uid) then
        return jsonb_build_object('outcome', 'not_found');
    end if;
    leaf := canvalo_private.leaf_below(p_id, p_message_id);
    if leaf is null then
        return jsonb_build_object('outcome', 'message_not_found');
    end if;
    update api.agent_conversations c set active_leaf_id = leaf where c.id = p_id returning * into conversation;
    return jsonb_build_object('outcome', 'done', 'conversation', to_jsonb(conversation) - 'words');
end;
$$;

-- Store.message_page: a page of one branch of the caller's conversation (the active one, or the newest below
-- p_leaf), ordered and sought as 006 pages a whole conversation, with each message's siblings (its parent's children,
-- oldest first) as {"<parent id, or empty for first messages>": [ids]}.
create or replace function api.agent_message_branch(
    p_conversation_id uuid,
    p_leaf uuid default null,
    p_limit integer default 100,
    p_offset integer default 0,
    p_downwards boolean default false,
    p_before_at timestamptz default null,
    p_before_seq bigint default null,
    p_after_at timestamptz default null,
    p_after_seq bigint default null
)
returns jsonb
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
    uid uuid := canvalo_private.caller();
    leaf uuid;
    page jsonb;
begin
    if p_limit is null or p_limit not between 1 and 501 or p_offset is null or p_offset not between 0 and 1000000 then
        raise exception 'invalid page' using errcode = '22023';
    end if;
    select c.active_leaf_id into leaf from api.agent_conversations c where c.id = p_conversation_id and c.user_id = uid;
    if not found then
        return jsonb_build_object('outcome', 'not_found');
    end if;
    if p_leaf is not null then
        leaf := canvalo_private.leaf_below(p_conversation_id, p_leaf);
        if leaf is null then
            return jsonb_build_object('outcome', 'message_not_found');
        end if;
    end if;
    select coalesce(jsonb_agg(to_jsonb(r) order by r.n), '[]'::jsonb) into page from (
        select m.id, m.conversation_id, m.role, m.content, m.agent_type, m.metadata, m.created_at, m.seq, m.parent_id,
               row_number() over (order by case when p_downwards then m.created_at end desc,
                                           case when p_downwards then m.seq end desc, m.created_at, m.seq) as n
          from api.agent_messages m
         where m.id in (select p.id from canvalo_private.path_to(p_conversation_id, leaf) p)
           and (p_before_at is null or (m.created_at, m.seq) < (p_before_at, p_before_seq))
           and (p_after_at is null or (m.created_at, m.seq) > (p_after_at, p_after_seq))
         order by case when p_downwards then m.created_at end desc, case when p_downwards then m.seq end desc,
                  m.created_at, m.seq
         limit p_limit offset p_offset) r;
    return jsonb_build_object('outcome', 'done', 'leaf', leaf, 'rows', page, 'siblings', coalesce((
        select jsonb_object_agg(coalesce(s.parent_id::text, ''), s.ids)
          from (select m.parent_id, jsonb_agg(m.id order by m.created_at, m.seq) as ids
                  from api.agent_messages m
                 where m.conversation_id = p_conversation_id
                   and (m.parent_id in (select (x ->> 'parent_id')::uuid from jsonb_array_elements(page) x)
                        or (m.parent_id is null
                            and exists (select 1 from jsonb_array_elements(page) x where x ->> 'parent_id' is null)))
                 group by m.parent_id) s), '{}'::jsonb));
end;
$$;

-- 007 run again brings back its agent_run_begin beside this one: dropped here, and 007 calls this when it exists.
create or replace function canvalo_private.lock_branches()
returns void
language plpgsql
set search_path = ''
as $$
begin
    drop function if exists api.agent_run_begin(uuid, uuid, text, text, uuid, uuid, double precision,
                                                double precision, integer, integer, text, uuid, integer, integer);
end;
$$;

revoke all on function api.agent_run_begin(uuid, uuid, text, text, uuid, uuid, double precision, double precision,
                                           integer, integer, text, uuid, integer, integer, uuid, uuid, uuid)
    from public, anon;
revoke all on function api.agent_conversation_set_leaf(uuid, uuid) from public, anon;
revoke all on function api.agent_message_branch(uuid, uuid, integer, integer, boolean, timestamptz, bigint,
                                                timestamptz, bigint) from public, anon;
grant execute on function api.agent_run_begin(uuid, uuid, text, text, uuid, uuid, double precision,
                                              double precision, integer, integer, text, uuid, integer, integer, uuid,
                                              uuid, uuid) to authenticated;
grant execute on function api.agent_conversation_set_leaf(uuid, uuid) to authenticated;
grant execute on function api.agent_message_branch(uuid, uuid, integer, integer, boolean, timestamptz, bigint,
                                                   timestamptz, bigint) to authenticated;

select canvalo_private.lock_chat_writes();

commit;

notify pgrst, 'reload schema';
