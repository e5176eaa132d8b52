-- Canvalo chat: the caller's usage report lists at most 100 conversations (the most tokens first) and counts them all.
--
-- Apply after 001-017 (`for f in migrations/*.sql; ...`, README); safe to run more than once, at any time after 013.
-- It redefines 013's api.agent_usage_report, with the same argument and rules: the caller's own rows only, their
-- usage by model and their live reservations as before. 013's listed every conversation with usage since p_since, so
-- a user whose month had touched a hundred thousand conversations had each GET /api/usage aggregate and send all of
-- them; now `by_conversation` holds the 100 that used the most tokens (the service's USAGE_CONVERSATIONS) and
-- `by_conversation_total` how many there are. The service reads either answer (it cuts 013's to the same shape), so
-- this can be applied before or after deploying it; 013 run again alone after this one brings back its unbounded
-- report: run this one again after it (running them all in order, as README says, does).

begin;

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
    conversations bigint;
begin
    if p_since is null then
        raise exception 'invalid usage period' using errcode = '22023';
    end if;
    select * into reserved from canvalo_private.usage_reserved(uid);
    select count(distinct u.conversation_id) into conversations
      from api.agent_usage u where u.user_id = uid and u.created_at >= p_since;
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
                 group by u.conversation_id
                 order by tokens desc, u.conversation_id
                 limit 100) c), '[]'::jsonb),
        'by_conversation_total', conversations,
        'reserved_tokens', reserved.tokens,
        'reserved_cost', reserved.cost);
end;
$$;

revoke all on function api.agent_usage_report(timestamptz) from public, anon;
grant execute on function api.agent_usage_report(timestamptz) to authenticated;

commit;

notify pgrst, 'reload schema';
