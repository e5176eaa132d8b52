-- Canvalo chat: a run's answer is saved by its write key alone, whoever's token has expired, in one call for every
-- run a worker generates.
--
-- Apply after 001-008 (`for f in migrations/*.sql; ...`, README); safe to run more than once. Deploy it together with
-- this version of the service, which flushes through it.
--
-- 007's agent_runs_flush acted as the signed-in user, so a worker flushed its runs in one request per user, each with
-- that user's token: its requests grew with the users streaming, and an answer outliving its user's access token
-- (an hour by default, against runs of up to RUN_MAX_SECONDS) could no longer be saved. Now the per-run write key
-- 007 introduced is the whole authority to write a run (begin made it, keeps only its hash, and the service never
-- sends it to a client): the function is granted to `anon` too, the service calls it with no user token, and one
-- call carries up to 500 runs of any users. What a key allows is unchanged from 007: its own run only, while it
-- runs, events only forward, one terminal state, metadata naming its own run. A wrong key or an unknown run is
-- reported like a run that is gone, so the answer tells a caller nothing about runs it holds no key for.

begin;

-- Store.flush_runs: see 007's header for what each update may do.
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
            metadata jsonb, agent_type text, heartbeat boolean, final_status text)
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
           or u.last_seq > 10000000 or octet_length(u.frames) > 8388608 or char_length(u.content) > 2000000 then
            continue;  -- not applied: one call carries many users' runs, so one bad update must not fail the rest
        end if;
        applied := applied || run.id;
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

-- `anon` reaches this function and nothing else in the schema: no table, sequence or other function (whatever
-- default privileges a project has), which tests/test_data_api.py checks against every object.
grant usage on schema api to anon;
revoke all on all tables in schema api from anon;
revoke all on all sequences in schema api from anon;
revoke all on all functions in schema api from anon;
revoke all on function api.agent_runs_flush(jsonb) from public;
grant execute on function api.agent_runs_flush(jsonb) to anon, authenticated;

select canvalo_private.lock_chat_writes();

commit;

-- Tell PostgREST to reload its schema cache so the changed function is visible at once.
notify pgrst, 'reload schema';
