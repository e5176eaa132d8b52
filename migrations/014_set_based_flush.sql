-- Canvalo chat: a flush costs PostgreSQL a fixed handful of statements per call instead of several per run.
--
-- Apply after 001-013 (`for f in migrations/*.sql; ...`, README); safe to run more than once. Deploy it with this
-- version of the service, or any since 013: the function's arguments and answer are 013's. It redefines 013's
-- agent_runs_flush: 009 or 013 run again alone after this one brings its own version back (the same rules, slower),
-- so run this one again after it (running them all in order, as README says, does).
--
-- 013's agent_runs_flush looped over the updates, running five to eight statements for each run (lock, last event,
-- events, text, heartbeat or end, ledger). Each statement inside PL/pgSQL has a fixed cost well above the row work it
-- does, and with 500 streams every run is flushed about four times a second: that fixed cost was most of what a
-- flushed update cost PostgreSQL. Here each step is one statement over every update of the call, in this order, each
-- seeing the rows the earlier ones wrote:
--
-- 1. lock the runs whose write key matches, in run id order (two flushes over the same runs lock them in the same
--    order, so they cannot deadlock), and judge each update: applied or not, written or not;
-- 2. the ledger; 3. the events; 4. the answer's text; 5. heartbeat or end, whose last_seq sees the events of step 3.
--
-- The rules are 013's (see 007's header for what each update may do), each update still judged alone: the write key
-- is the only authority (a wrong key or an unknown run is reported as gone, saying nothing); an ended run's identical
-- end sent again counts as applied; a bad update is skipped without failing the others; events only go forward.
-- One difference: a call naming a run twice is refused (22023) where 013 applied the two updates one after the other.
-- The service sends one update per run per flush (RunManager._flush, one per live run), so it never sends one.

begin;

-- Store.flush_runs: 013's answer, one row per run named: stop, seen_chars, gone, deleted, applied.
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
    -- What the updates written carry, so a step none of them needs costs nothing (a small call's fixed cost).
    with_calls boolean;
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
           coalesce(bool_or(l.calls is not null) filter (where l.status = 'running' and l.good), false),
           coalesce(bool_or(l.frames is not null) filter (where l.status = 'running' and l.good), false),
           coalesce(bool_or(l.content is not null) filter (where l.status = 'running' and l.good), false),
           coalesce(bool_or(l.final_status is not null or coalesce(l.heartbeat, false))
                        filter (where l.status = 'running' and l.good), false)
      into verified, applied, writing, with_calls, with_frames, with_content, with_run
      from (select r.id, r.status, r.last_seq as stored_last_seq, x.final_status, x.last_seq, x.calls, x.frames,
                   x.content, x.heartbeat,
                   -- One call carries many users' runs, so one bad update must not fail the rest: it is not applied.
                   ((x.final_status is not null
                     and x.final_status not in ('complete', 'error', 'interrupted', 'stopped'))
                    or x.last_seq > 10000000 or octet_length(x.frames) > 8388608 or char_length(x.content) > 2000000
                    or (x.calls is not null and case when jsonb_typeof(x.calls) <> 'array' then true
                                                     else jsonb_array_length(x.calls) > 1000 end)) is not true as good
              from jsonb_to_recordset(p_updates) as x (run_id uuid, write_key text, last_seq integer, frames text,
                                                       content text, heartbeat boolean, final_status text,
                                                       calls jsonb)
              join api.agent_runs r on r.id = x.run_id
              join canvalo_private.run_keys k
                on k.run_id = r.id and k.key_hash = pg_catalog.sha256(pg_catalog.convert_to(x.write_key, 'UTF8'))
             order by r.id
               for update of r) l;

    if with_calls then
        -- The ledger: under the run's own user and conversation, once per (run, call index).
        insert into api.agent_usage (run_id, call_index, user_id, conversation_id, agent_type, model_id,
                                     input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost,
                                     estimated)
        select r.id, c.call_index, r.user_id, r.conversation_id, c.agent_type, c.model_id,
               c.input_tokens, c.output_tokens, c.cache_read_tokens, c.cache_write_tokens, c.cost,
               coalesce(c.estimated, false)
          from jsonb_to_recordset(p_updates) as x (run_id uuid, calls jsonb)
          join api.agent_runs r on r.id = x.run_id
          -- Only a written update's calls are an array; the case keeps a skipped update's from being expanded.
          cross join lateral jsonb_to_recordset(case when x.run_id = any (writing) and jsonb_typeof(x.calls) = 'array'
                                                     then x.calls end) as c (
                   call_index integer, agent_type text, model_id text, input_tokens bigint, output_tokens bigint,
                   cache_read_tokens bigint, cache_write_tokens bigint, cost numeric, estimated boolean)
         where x.run_id = any (writing)
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

-- 009's: the flush, by its write keys alone, is the one function anon reaches.
revoke all on function api.agent_runs_flush(jsonb) from public;
grant execute on function api.agent_runs_flush(jsonb) to anon, authenticated;

select canvalo_private.lock_chat_writes();

commit;

notify pgrst, 'reload schema';
