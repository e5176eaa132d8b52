-- Canvalo chat: only the service begins a run that can be written, and a run's model calls are in the usage ledger
-- whatever becomes of the run.
--
-- Apply after 001-016 (`for f in migrations/*.sql; ...`, README), with this version of the service; safe to run more
-- than once. Before the service can begin a turn, the database needs the SHA-256 of the secret its workers hold
-- (SUPABASE_RUN_SECRET): see docs/production.md, "The run secret", for the steps (without downtime: set the secret
-- on the workers first, then apply this file and register it). It redefines 014's agent_runs_flush: 009, 013 or 014
-- run again alone after this one bring their own back (calls recorded only while the run is running): run this one
-- again after it (running them all in order, as README says, does). Every other rule below holds whichever version of
-- agent_run_begin is installed, since each registers its run's key here.
--
-- Two ways a user acting alone through the Data API could get round what the service enforces:
-- * A run's write key is the whole authority of agent_runs_flush, which writes as `anon` and outside the database's
--   write ceiling (the flush carries the events of every user's runs). A user calling agent_run_begin themselves
--   chose their own key, and with it could store events and text without limit (heartbeats keep a run running, so
--   its events are never purged), and ledger rows of their own making. Now a key is registered only when the request
--   shows the service's run secret: PostgREST passes the request's headers to SQL (`request.headers`), the service
--   sends `X-Canvalo-Run-Secret` with each begin, and the database keeps only the secret's SHA-256
--   (canvalo_private.run_secrets, several while one is being replaced). Without it, agent_run_begin is refused
--   whole (28P01, which PostgREST answers 403) and nothing is written. So every run with a key was admitted by the
--   service, with the service's limits, budget and staleness, and only the service holds its key.
-- * A model call's usage rode the run's flushes, written only while the run was running. A user ending their own run
--   early (agent_runs_maintain with a short staleness, which stays theirs to call) or deleting its conversation
--   mid-answer had the worker's next flush refused, and with it what the answer had cost so far: their budget never
--   saw it. Now a run's key outlives the run and remembers whose run it was, and the flush writes the calls of every
--   run whose key matches, running or not, there or not, under that user and conversation. A key whose run is not
--   running goes a day after it was made, when its user begins another turn.

begin;

-- The SHA-256 of each secret the service's workers may show; none at first (no run can be begun until one is added).
create table if not exists canvalo_private.run_secrets (
    hash bytea primary key check (octet_length(hash) = 32),
    created_at timestamptz not null default now()
);
alter table canvalo_private.run_secrets enable row level security;

-- A new secret for SUPABASE_RUN_SECRET, kept here as its hash only, and answered once: run it in the SQL editor as
-- the owner (`select canvalo_private.new_run_secret();`), so no secret is ever typed into a statement.
create or replace function canvalo_private.new_run_secret()
returns text
language plpgsql
volatile
set search_path = ''
as $$
declare
    -- 64 hex digits from two random UUIDs: 244 random bits (gen_random_uuid uses the server's strong random source).
    secret text := pg_catalog.replace(pg_catalog.gen_random_uuid()::text || pg_catalog.gen_random_uuid()::text, '-', '');
begin
    insert into canvalo_private.run_secrets (hash) values (pg_catalog.sha256(pg_catalog.convert_to(secret, 'UTF8')));
    return secret;
end;
$$;

-- A run's key now says whose run it was, and stays when the run goes (with its conversation): the ledger needs both.
alter table canvalo_private.run_keys add column if not exists user_id uuid;
alter table canvalo_private.run_keys add column if not exists conversation_id uuid;
alter table canvalo_private.run_keys add column if not exists created_at timestamptz not null default now();
alter table canvalo_private.run_keys drop constraint if exists run_keys_run_id_fkey;
update canvalo_private.run_keys k set user_id = r.user_id, conversation_id = r.conversation_id
  from api.agent_runs r where r.id = k.run_id and k.user_id is null;
create index if not exists run_keys_user_created_idx on canvalo_private.run_keys (user_id, created_at);

-- Every agent_run_begin registers its run's key with one insert into run_keys, right after its run's row: checked
-- here, once for every version of begin.
create or replace function canvalo_private.run_key_admit()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
    shown text := nullif(pg_catalog.current_setting('request.headers', true), '')::jsonb
                  ->> 'x-canvalo-run-secret';
begin
    if shown is null or pg_catalog.char_length(shown) < 32 or not exists (
        select 1 from canvalo_private.run_secrets s
         where s.hash = pg_catalog.sha256(pg_catalog.convert_to(shown, 'UTF8'))) then
        raise exception 'canvalo: a run is begun only by the service, with its run secret' using
            errcode = '28P01',
            hint = 'Set SUPABASE_RUN_SECRET on every worker to a secret whose SHA-256 is in canvalo_private.run_secrets.';
    end if;
    select r.user_id, r.conversation_id into new.user_id, new.conversation_id
      from api.agent_runs r where r.id = new.run_id;
    if new.user_id is null then
        raise exception 'canvalo: a run key without its run' using errcode = '23503';
    end if;
    -- The same run id begun again after its conversation was deleted: the old key is that run's, now gone.
    delete from canvalo_private.run_keys k where k.run_id = new.run_id;
    -- This user's keys of runs long over: a day is far past any flush still bringing a run's last calls.
    delete from canvalo_private.run_keys k
     where k.user_id = new.user_id and k.created_at < now() - interval '1 day'
       and not exists (select 1 from api.agent_runs r where r.id = k.run_id and r.status = 'running');
    return new;
end;
$$;

drop trigger if exists run_keys_admit on canvalo_private.run_keys;
create trigger run_keys_admit
    before insert on canvalo_private.run_keys
    for each row execute function canvalo_private.run_key_admit();

create or replace function api.agent_runs_flush(p_updates jsonb)
returns jsonb
language plpgsql
volatile
security definer
set search_path = ''
-- Each statement's custom plan (the arrays' contents known) is no better than its generic one, which is kept across
-- calls: planning all of them again on every call cost more than running them for one run.
set plan_cache_mode = force_generic_plan
as $$
declare
    verified uuid[];
    applied uuid[];
    writing uuid[];
    good uuid[];
    -- What the updates written carry, so a step none of them needs costs nothing (a small call's fixed cost).
    with_frames boolean;
    with_content boolean;
    with_run boolean;
begin
    -- Bounds: as many runs as the service sends in one call (services/store/postgrest/store.py, FLUSH_BATCH), each a
    -- few hundred milliseconds of events; far below what would make one call expensive. A run named twice would have
    -- its two updates judged against the same stored state, so such a call is refused rather than half-applied.
    if jsonb_typeof(p_updates) is distinct from 'array' or jsonb_array_length(p_updates) > 500
       or (select count(x.run_id) <> count(distinct x.run_id)
             from jsonb_to_recordset(p_updates) as x (run_id uuid)) then
        raise exception 'invalid flush' using errcode = '22023';
    end if;

    -- One call carries many users' runs, so one bad update must not fail the rest: it is not applied, nor its calls
    -- recorded.
    select coalesce(array_agg(x.run_id) filter (where (
               (x.final_status is not null and x.final_status not in ('complete', 'error', 'interrupted', 'stopped'))
               or x.last_seq > 10000000 or octet_length(x.frames) > 8388608 or char_length(x.content) > 2000000
               or (x.calls is not null and case when jsonb_typeof(x.calls) <> 'array' then true
                                                else jsonb_array_length(x.calls) > 1000 end)) is not true), '{}')
      into good
      from jsonb_to_recordset(p_updates) as x (run_id uuid, last_seq integer, frames text, content text,
                                               final_status text, calls jsonb);

    -- The write key is the authority: whoever holds it may write this run, as its user, and nothing else. A run with
    -- no such key is neither verified nor applied: reported as gone, saying nothing of any run. The key's hash is
    -- canvalo_private.key_hash's body, written out: a function with its own search_path is not inlined, and calling
    -- it per row cost more than the rest of the lock. The locked rows are the latest versions (a concurrent flush
    -- that ended a run first is seen ended).
    select coalesce(array_agg(l.id), '{}'),
           coalesce(array_agg(l.id) filter (
               where (l.status <> 'running' and l.status = l.final_status and l.stored_last_seq = l.last_seq)
                  or (l.status = 'running' and l.good)), '{}'),
           coalesce(array_agg(l.id) filter (where l.status = 'running' and l.good), '{}'),
           coalesce(bool_or(l.frames is not null) filter (where l.status = 'running' and l.good), false),
           coalesce(bool_or(l.content is not null) filter (where l.status = 'running' and l.good), false),
           coalesce(bool_or(l.final_status is not null or coalesce(l.heartbeat, false))
                        filter (where l.status = 'running' and l.good), false)
      into verified, applied, writing, with_frames, with_content, with_run
      from (select r.id, r.status, r.last_seq as stored_last_seq, x.final_status, x.last_seq, x.calls, x.frames,
                   x.content, x.heartbeat, x.run_id = any (good) as good
              from jsonb_to_recordset(p_updates) as x (run_id uuid, write_key text, last_seq integer, frames text,
                                                       content text, heartbeat boolean, final_status text,
                                                       calls jsonb)
              join api.agent_runs r on r.id = x.run_id
              join canvalo_private.run_keys k
                on k.run_id = r.id and k.key_hash = pg_catalog.sha256(pg_catalog.convert_to(x.write_key, 'UTF8'))
             order by r.id
               for update of r) l;

    -- The ledger (017): every model call of a run whose key matches, under the user and conversation its key was
    -- registered for, whatever became of the run since: ended by another worker or by its user, or deleted with its
    -- conversation, what its calls cost was spent, and a budget counts it. Once per (run, call index).
    if pg_catalog.jsonb_path_exists(p_updates, '$[*].calls[0]') then
        insert into api.agent_usage (run_id, call_index, user_id, conversation_id, agent_type, model_id,
                                     input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost,
                                     estimated)
        select k.run_id, c.call_index, k.user_id, k.conversation_id, c.agent_type, c.model_id,
               c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens, c.cost,
               coalesce(c.estimated, false)
          from jsonb_to_recordset(p_updates) as x (run_id uuid, write_key text, calls jsonb)
          join canvalo_private.run_keys k
            on k.run_id = x.run_id and k.key_hash = pg_catalog.sha256(pg_catalog.convert_to(x.write_key, 'UTF8'))
          -- The case keeps a bad update's list from being expanded.
          cross join lateral jsonb_to_recordset(case when x.run_id = any (good) then x.calls end) as c (
                   call_index integer, agent_type text, model_id text, input_tokens bigint, output_tokens bigint,
                   cache_read_tokens bigint, cache_write_tokens bigint, cost numeric, estimated boolean)
         where k.user_id is not null
           and c.call_index between 0 and 999 and char_length(c.agent_type) between 1 and 64
           and char_length(c.model_id) between 1 and 2048
           and least(c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens) >= 0
           and greatest(c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens) < 100000000
           and (c.cost is null or c.cost between 0 and 1000000)
        on conflict (run_id, call_index) do nothing;
    end if;

    if with_frames then
        -- Events only go forward, so a run's last stored is the one with the highest seq: one index probe.
        insert into api.agent_run_events (run_id, seq, last_seq, frames)
        select b.run_id, b.stored + 1, b.last_seq, b.tail
          from (select x.run_id, s.stored, x.last_seq,
                       case when x.first_seq > s.stored then x.frames
                            -- The batch re-sends events already stored (the flush that stored them lost its answer)
                            -- and adds new ones: keep the new ones. Every frame starts a line with "id: N", and a
                            -- frame's data is one JSON line, so the frame after `stored` starts right after its
                            -- separator; none found, nothing is stored.
                            else (select case when p.cut = 0 then null else substr(x.frames, p.cut + 2) end
                                    from (select strpos(x.frames, E'\n\nid: ' || (s.stored + 1) || E'\n') as cut) p)
                       end as tail
                  from jsonb_to_recordset(p_updates) as x (run_id uuid, first_seq integer, last_seq integer,
                                                           frames text)
                  -- offset 0: one probe per run, rather than one per condition naming `stored`.
                  cross join lateral (
                      select coalesce((select e.last_seq from api.agent_run_events e where e.run_id = x.run_id
                                        order by e.seq desc limit 1), 0) as stored offset 0) s
                 where x.run_id = any (writing) and x.frames is not null
                   and x.first_seq <= s.stored + 1 and x.last_seq > s.stored and x.last_seq >= x.first_seq) b
         where b.tail is not null;
    end if;

    if with_content then
        -- The metadata names this run whatever the update says, so it can point nowhere else.
        update api.agent_messages m
           set content = x.content,
               metadata = case when jsonb_typeof(x.metadata) = 'object' then x.metadata else '{}'::jsonb end
                          || jsonb_build_object('run_id', r.id),
               agent_type = coalesce(x.agent_type, m.agent_type)
          from jsonb_to_recordset(p_updates) as x (run_id uuid, content text, metadata jsonb, agent_type text)
          join api.agent_runs r on r.id = x.run_id
         where x.run_id = any (writing) and x.content is not null
           and m.id = r.assistant_message_id and m.conversation_id = r.conversation_id and m.role = 'assistant';
    end if;

    if with_run then
        -- The end, once, with the last event stored (this call's included: an earlier statement wrote them); else the
        -- heartbeat.
        update api.agent_runs r
           set status = coalesce(x.final_status, r.status),
               ended_at = case when x.final_status is null then r.ended_at else now() end,
               heartbeat_at = now(),
               last_seq = case when x.final_status is null then r.last_seq
                               else coalesce((select e.last_seq from api.agent_run_events e where e.run_id = r.id
                                               order by e.seq desc limit 1), 0) end
          from jsonb_to_recordset(p_updates) as x (run_id uuid, heartbeat boolean, final_status text)
         where r.id = x.run_id and x.run_id = any (writing)
           and (x.final_status is not null or coalesce(x.heartbeat, false));
    end if;

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

revoke all on function api.agent_runs_flush(jsonb) from public;
grant execute on function api.agent_runs_flush(jsonb) to anon, authenticated;

select canvalo_private.lock_chat_writes();

commit;

notify pgrst, 'reload schema';
