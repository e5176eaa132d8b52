-- Canvalo chat: pending actions for the Supabase store (services/agents/actions.py, services/store/postgrest/store.py).
--
-- Apply after 001-004 with the SQL editor or `psql "$DATABASE_URL" -f migrations/005_pending_actions.sql`; safe to run
-- more than once. A model follows text it reads, including text planted in a user's own records, so a delete (or a
-- change of an invoice's or proposal's amounts or status) that the model asks for is not run: it is kept in
-- api.pending_actions and runs only when the same user confirms it (POST /api/actions/{action_id}/confirm), once,
-- before it expires. The table mirrors SQLite's (services/store/sqlite/actions.py), and so do the functions below, which the
-- service calls through PostgREST RPC as the signed-in user, each store call one request and one transaction:
--
--   POST /rest/v1/rpc/pending_action_create   {"p_id", "p_table", "p_tool", "p_kind", "p_record_id", "p_changes",
--                                              "p_summary", "p_ttl_seconds"}
--        -> the action's row | null (the id belongs to someone else)
--   POST /rest/v1/rpc/pending_action_confirm  {"p_action_id"}
--        -> {"outcome": "done", "action": {...}, "record": {...} | null}
--           | {"outcome": "not_found" | "used" | "expired"} | {"outcome": "record_not_found", "table": "contacts"}
--
-- Security model: the functions are SECURITY INVOKER, so they run as the caller and row-level security applies to
-- every row they touch, exactly as to a direct request. A user reads, creates, marks and deletes only their own
-- actions (auth.uid() = user_id); an action can be marked used only while unused, and never unmarked, even by a
-- direct request. Confirming runs the change as the user too: the business tables' policies and column grants (002)
-- decide what it may touch, so an action can do nothing its owner could not do with a direct request; what it
-- prevents is the model acting without the owner. The change is the statement PostgREST runs for the store's
-- update_record/delete_record (UPDATE/DELETE ... WHERE id = $1 AND user_id = $2 RETURNING), on a table named by a
-- check constraint's list and columns quoted with %I. Nothing is granted to `anon`.

begin;

-- -- table ----------------------------------------------------------------------------------------------------------

create table if not exists api.pending_actions (
    id uuid primary key,
    user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
    table_name text not null check (table_name in ('invoices', 'appointments', 'projects', 'proposals', 'contacts',
                                                   'reviews', 'campaigns', 'tasks', 'goals')),
    tool text not null,
    kind text not null check (kind in ('update', 'delete')),
    record_id uuid not null,
    changes jsonb,
    summary text not null,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    used_at timestamptz,
    -- An update carries a non-empty object of columns; a delete nothing.
    constraint pending_actions_changes check (
        (kind = 'delete' and changes is null)
        or (kind = 'update' and jsonb_typeof(changes) = 'object' and changes <> '{}'::jsonb))
);

-- The caller's actions by expiry: what a confirmation reads, and what the pruning in pending_action_create deletes.
create index if not exists pending_actions_user_expiry on api.pending_actions (user_id, expires_at);

-- -- row-level security ---------------------------------------------------------------------------------------------

alter table api.pending_actions enable row level security;

drop policy if exists pending_actions_select on api.pending_actions;
drop policy if exists pending_actions_insert on api.pending_actions;
drop policy if exists pending_actions_update on api.pending_actions;
drop policy if exists pending_actions_delete on api.pending_actions;

create policy pending_actions_select on api.pending_actions
    for select to authenticated using ((select auth.uid()) = user_id);
create policy pending_actions_insert on api.pending_actions
    for insert to authenticated with check ((select auth.uid()) = user_id and used_at is null);
-- Single use holds for direct requests too: only an unused action can be marked, and the mark cannot be removed.
create policy pending_actions_update on api.pending_actions
    for update to authenticated
    using ((select auth.uid()) = user_id and used_at is null)
    with check ((select auth.uid()) = user_id and used_at is not null);
create policy pending_actions_delete on api.pending_actions
    for delete to authenticated using ((select auth.uid()) = user_id);

-- -- grants: `authenticated` only, and only the columns the functions write ----------------------------------------

revoke all on api.pending_actions from public, anon, authenticated;
grant select, delete on api.pending_actions to authenticated;
grant insert (id, user_id, table_name, tool, kind, record_id, changes, summary, expires_at)
    on api.pending_actions to authenticated;
grant update (used_at) on api.pending_actions to authenticated;

-- -- functions ------------------------------------------------------------------------------------------------------
-- Every function has an empty search_path (names are schema-qualified) so nothing a user creates can shadow what it
-- calls, and takes "now" from now(): one clock, the database's, for creating and for expiring.

-- Store.create_action (sqlite_actions.create_action): keep the caller's action for p_ttl_seconds, after deleting
-- their actions that expired over a day ago (kept that long so a late confirmation still says `expired`). A replay
-- (same p_id: the id is the service's) inserts nothing and returns the row.
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
set search_path = ''
as $$
declare
    uid uuid := auth.uid();
    action api.pending_actions;
begin
    if uid is null then
        raise exception 'pending_action_create requires a signed-in user' using errcode = '42501';
    end if;
    if p_ttl_seconds is null or p_ttl_seconds <= 0 then
        raise exception 'invalid ttl' using errcode = '22023';
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
-- its change in the same transaction. A change that finds no row (the record went, or is not the caller's) raises
-- no_data_found, which rolls back this block, claim included, so the action stays unused.
create or replace function api.pending_action_confirm(p_action_id uuid)
returns jsonb
language plpgsql
volatile
set search_path = ''
as $$
declare
    uid uuid := auth.uid();
    action api.pending_actions;
    assignments text;
    changed jsonb;
begin
    if uid is null then
        raise exception 'pending_action_confirm requires a signed-in user' using errcode = '42501';
    end if;
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

revoke all on function api.pending_action_create(uuid, text, text, text, uuid, jsonb, text, double precision)
    from public, anon;
revoke all on function api.pending_action_confirm(uuid) from public, anon;
grant execute on function api.pending_action_create(uuid, text, text, text, uuid, jsonb, text, double precision)
    to authenticated;
grant execute on function api.pending_action_confirm(uuid) to authenticated;

-- A deployment that has applied 007 keeps only checked writes when this file runs again (007_checked_writes.sql).
do $$
begin
    if pg_catalog.to_regprocedure('canvalo_private.lock_chat_writes()') is not null then
        perform canvalo_private.lock_chat_writes();
    end if;
end;
$$;

-- A deployment that has applied 010 keeps its pending-action functions when this file runs again: the versions this
-- file brings back stay closed (010_confirm_every_change.sql).
do $$
begin
    if pg_catalog.to_regprocedure('canvalo_private.lock_pending_actions()') is not null then
        perform canvalo_private.lock_pending_actions();
    end if;
end;
$$;

commit;

-- Tell PostgREST to reload its schema cache so the new table and functions are visible at once.
notify pgrst, 'reload schema';
