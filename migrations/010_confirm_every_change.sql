-- Canvalo chat: every change the assistant prepares is shown whole, kept with what it replaces, and runs only on the
-- record as it was shown (services/agents/actions.py, services/store/postgrest/store.py).
--
-- Apply after 001-009 with the SQL editor or `psql "$DATABASE_URL" -f migrations/010_confirm_every_change.sql`; safe to
-- run more than once. Deploy it with the service version that calls the functions below; it replaces 005's and 007's
-- pending_action_create and pending_action_confirm, which the earlier version calls.
--
-- * Every update the model asks for now waits for the user, not only deletes and money or status columns (a planted
--   note had reset every contact's email, phone and notes). The service keeps each as a pending action with
--   `before`, the record's values the change replaces (the changed columns of an update, every column of a delete),
--   and shows the user `before` and the new values in full.
-- * Confirming runs the change only while the record still holds `before`, compared column by column at each
--   column's type in the very statement that writes, so the user overwrites exactly what they were shown and
--   `before` is what a client needs to undo it. Otherwise nothing changes and the action stays unused
--   (`record_changed`). An action kept before this file has no `before` (it was shown cut short) and is `expired`.
-- * Values that do not fit their columns are refused when the action is kept, not when the user confirms it.
--
-- New calls (as the signed-in user; nothing is granted to `anon`), SECURITY DEFINER with an empty search_path like
-- 007's, each naming the caller (auth.uid()) in every row it touches:
--
--   POST /rest/v1/rpc/pending_action_prepare  {"p_id", "p_table", "p_tool", "p_kind", "p_record_id", "p_changes",
--                                              "p_before", "p_summary", "p_ttl_seconds"}
--        -> the action's row | null (the id or the record is someone else's)
--   POST /rest/v1/rpc/pending_action_apply    {"p_action_id"}
--        -> {"outcome": "done", "action": {...}, "record": {...} | null}
--           | {"outcome": "not_found" | "used" | "expired"}
--           | {"outcome": "record_not_found" | "record_changed", "table": "contacts"}
--
-- The functions have new names so that running 005 or 007 again, which brings back their versions, cannot replace
-- these: those files end by calling canvalo_private.lock_pending_actions(), which closes the old versions again, with
-- a warning, until this file runs again and drops them.

begin;

-- -- the values a change replaces -----------------------------------------------------------------------------------

alter table api.pending_actions add column if not exists before jsonb;
alter table api.pending_actions drop constraint if exists pending_actions_before;
alter table api.pending_actions add constraint pending_actions_before
    check (before is null or jsonb_typeof(before) = 'object');

-- -- 005's and 007's functions: gone, and closed again whenever an earlier file brings them back -------------------

drop function if exists api.pending_action_create(uuid, text, text, text, uuid, jsonb, text, double precision);
drop function if exists api.pending_action_confirm(uuid);

create or replace function canvalo_private.lock_pending_actions()
returns void
language plpgsql
set search_path = ''
as $$
declare
    f record;
begin
    for f in
        select fn.oid::pg_catalog.regprocedure as signature
          from pg_catalog.pg_proc fn join pg_catalog.pg_namespace n on n.oid = fn.pronamespace
         where n.nspname = 'api' and fn.proname in ('pending_action_create', 'pending_action_confirm')
    loop
        execute format('revoke all on function %s from public, anon, authenticated', f.signature);
        raise warning
            'canvalo: % comes from an earlier migration and is closed: apply 010_confirm_every_change.sql again',
            f.signature;
    end loop;
end;
$$;

revoke all on function canvalo_private.lock_pending_actions() from public, anon, authenticated;

-- -- functions ------------------------------------------------------------------------------------------------------

-- Store.create_action (sqlite_actions.create_action): keep the caller's action for p_ttl_seconds, after deleting
-- their actions that expired over a day ago (kept that long so a late confirmation still says `expired`). An update
-- names only columns users may update (002's column grants), and `before` names exactly those; a delete's `before`
-- names columns users may update too. A replay (same p_id: the id is the service's) inserts nothing and returns the
-- row; null when the id or the record is not the caller's.
create or replace function api.pending_action_prepare(
    p_id uuid,
    p_table text,
    p_tool text,
    p_kind text,
    p_record_id uuid,
    p_changes jsonb,
    p_before jsonb,
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
       or char_length(p_summary) > 100000 or char_length(p_tool) > 100
       or p_table not in ('invoices', 'appointments', 'projects', 'proposals', 'contacts', 'reviews', 'campaigns',
                          'tasks', 'goals')
       or jsonb_typeof(p_before) is distinct from 'object'
       or exists (select 1 from jsonb_object_keys(p_before) k where not canvalo_private.updatable(p_table, k))
       or (p_kind = 'update' and (jsonb_typeof(p_changes) is distinct from 'object'
           or (select array_agg(k order by k) from jsonb_object_keys(p_changes) k)
              is distinct from (select array_agg(k order by k) from jsonb_object_keys(p_before) k))) then
        raise exception 'invalid pending action' using errcode = '22023';
    end if;
    -- A value that does not fit its column fails its cast here (22P02, 22003), not when the user confirms.
    execute format('select jsonb_populate_record(null::api.%I, $1), jsonb_populate_record(null::api.%I, $2)',
                   p_table, p_table)
       using p_changes, p_before;
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
    insert into api.pending_actions (id, user_id, table_name, tool, kind, record_id, changes, before, summary,
                                     expires_at)
    values (p_id, uid, p_table, p_tool, p_kind, p_record_id, p_changes, p_before, p_summary,
            now() + make_interval(secs => p_ttl_seconds))
    on conflict (id) do nothing;
    select * into action from api.pending_actions a where a.id = p_id and a.user_id = uid;
    if not found then
        return null;
    end if;
    return to_jsonb(action);
end;
$$;

-- Store.confirm_action (sqlite_actions.confirm_action): claim the caller's action (used_at set only while it is null,
-- unexpired and has a `before`; of two confirmations at once the second waits for the first's row lock, then finds it
-- used) and run its change in the same transaction, on the caller's record only, and only while that record holds
-- every value of `before`: the condition is part of the UPDATE or DELETE, which PostgreSQL evaluates again on the
-- newest row when it had to wait for another writer. A change that finds no row raises, which rolls back this block,
-- claim included, so the action stays unused: `record_not_found` when the record went, `record_changed` when it no
-- longer holds `before`.
create or replace function api.pending_action_apply(p_action_id uuid)
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
    unchanged text;
    changed jsonb;
    exists_still boolean;
begin
    update api.pending_actions a
       set used_at = now()
     where a.id = p_action_id and a.user_id = uid and a.used_at is null and a.expires_at > now()
       and a.before is not null
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

    -- Checked again here: the grants may have narrowed since the action was kept.
    if exists (select 1 from jsonb_object_keys(action.before) k
                where not canvalo_private.updatable(action.table_name, k))
       or exists (select 1 from jsonb_object_keys(coalesce(action.changes, '{}')) k
                   where not canvalo_private.updatable(action.table_name, k)) then
        raise exception 'invalid pending action' using errcode = '22023';
    end if;
    -- `before` read at each column's type, as the change is: 960.5 is the numeric 960.50, "09:30" the time 09:30:00.
    select coalesce(string_agg(format('t.%I is not distinct from b.%I', k, k), ' and '), 'true') into unchanged
      from jsonb_object_keys(action.before) k;
    if action.kind = 'delete' then
        execute format('delete from api.%I t using jsonb_populate_record(null::api.%I, $1) b'
                       ' where t.id = $2 and t.user_id = $3 and %s returning jsonb_build_object(''id'', t.id)',
                       action.table_name, action.table_name, unchanged)
           into changed using action.before, action.record_id, uid;
    else
        -- jsonb_populate_record casts each value to its column's type, as PostgREST does for a PATCH body.
        select string_agg(format('%I = r.%I', k, k), ', ') into assignments from jsonb_object_keys(action.changes) k;
        execute format('update api.%I t set %s from jsonb_populate_record(null::api.%I, $1) r,'
                       ' jsonb_populate_record(null::api.%I, $4) b'
                       ' where t.id = $2 and t.user_id = $3 and %s returning to_jsonb(t)',
                       action.table_name, assignments, action.table_name, action.table_name, unchanged)
           into changed using action.changes, action.record_id, uid, action.before;
    end if;
    if changed is null then
        execute format('select exists (select 1 from api.%I t where t.id = $1 and t.user_id = $2)', action.table_name)
           into exists_still using action.record_id, uid;
        if exists_still then
            raise exception 'record changed' using errcode = 'CV409';
        end if;
        raise exception 'record not found' using errcode = 'P0002';
    end if;
    return jsonb_build_object('outcome', 'done', 'action', to_jsonb(action),
                              'record', case when action.kind = 'update' then changed end);
exception
    -- Variables keep their values through the rollback: `action` still names the table.
    when no_data_found then
        return jsonb_build_object('outcome', 'record_not_found', 'table', action.table_name);
    when sqlstate 'CV409' then
        return jsonb_build_object('outcome', 'record_changed', 'table', action.table_name);
end;
$$;

-- -- grants: the two functions to `authenticated` only --------------------------------------------------------------

revoke all on function api.pending_action_prepare(uuid, text, text, text, uuid, jsonb, jsonb, text, double precision)
    from public, anon;
revoke all on function api.pending_action_apply(uuid) from public, anon;
grant execute on function api.pending_action_prepare(uuid, text, text, text, uuid, jsonb, jsonb, text,
                                                     double precision) to authenticated;
grant execute on function api.pending_action_apply(uuid) to authenticated;

select canvalo_private.lock_pending_actions();

commit;

-- Tell PostgREST to reload its schema cache so the new functions are visible at once.
notify pgrst, 'reload schema';
