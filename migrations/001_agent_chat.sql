-- Canvalo chat: conversations and messages for the Supabase store (STORE=supabase).
--
-- Apply it to your Supabase project with the SQL editor or `psql "$DATABASE_URL" -f migrations/001_agent_chat.sql`.
-- It is safe to run more than once, and safe on a database that already holds the earlier service's
-- api.agent_conversations / api.agent_messages: existing rows are kept, missing columns are added, and the earlier
-- service's triggers and policies on these two tables are replaced by the ones below (the earlier message trigger is
-- dropped: leaving it would count every new message twice).
--
-- Security model: the service sends each user's own access token, so PostgREST runs as role `authenticated` and the
-- policies below decide what each user can see and change (auth.uid() is the token's `sub`). Nothing is granted to
-- `anon`. Users may insert conversations and their own (`role = 'user'`) messages, rename and delete conversations,
-- and nothing else: messages are never updated or deleted directly, and assistant messages are written only by the
-- service's functions (004), so a client cannot rewrite or plant history. Counters and timestamps are kept by
-- triggers. Foreign-key checks bypass row-level security, so the message policies check the parent
-- conversation's owner explicitly.
--
-- The schema is `api` (the service's SUPABASE_SCHEMA default). Add it under Project Settings > Data API >
-- Exposed schemas. To use another schema, replace `api.` below and set SUPABASE_SCHEMA to match.

begin;

create schema if not exists api;
grant usage on schema api to authenticated;

-- -- tables ---------------------------------------------------------------------------------------------------------

create table if not exists api.agent_conversations (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
    title text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    last_message_at timestamptz,
    message_count integer not null default 0,
    metadata jsonb not null default '{}'::jsonb
);

create table if not exists api.agent_messages (
    id uuid primary key default gen_random_uuid(),
    conversation_id uuid not null references api.agent_conversations (id) on delete cascade,
    content text not null,
    role text not null check (role in ('user', 'assistant')),
    agent_type text,
    metadata jsonb not null default '{}'::jsonb,
    created_at timestamptz not null default now()
);

-- The earlier service's tables may lack these; `seq` breaks created_at ties so history order is stable.
alter table api.agent_conversations add column if not exists last_message_at timestamptz;
alter table api.agent_conversations add column if not exists message_count integer not null default 0;
alter table api.agent_conversations add column if not exists metadata jsonb not null default '{}'::jsonb;
alter table api.agent_messages add column if not exists metadata jsonb not null default '{}'::jsonb;
alter table api.agent_messages add column if not exists seq bigint generated always as identity;

-- -- indexes: the list query (a user's conversations by activity) and the history query (a conversation's messages)

create index if not exists agent_conversations_user_activity_idx
    on api.agent_conversations (user_id, updated_at desc, id);
create index if not exists agent_messages_conversation_order_idx
    on api.agent_messages (conversation_id, created_at, seq);

-- -- triggers: message_count, last_message_at and updated_at ------------------------------------------------------

-- The earlier service's triggers on these tables (the message one would double-count with ours).
drop trigger if exists update_agent_conversation_on_message_trigger on api.agent_messages;
drop trigger if exists update_agent_conversations_updated_at on api.agent_conversations;

-- SECURITY DEFINER so the counters stay right although users have no UPDATE right on them; it only touches the
-- parent of a row the policies already let the user insert or delete. An empty search_path keeps it hijack-proof.
create or replace function api.agent_messages_touch_conversation()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
    if tg_op = 'INSERT' then
        update api.agent_conversations
           set message_count = message_count + 1,
               last_message_at = greatest(last_message_at, new.created_at),
               updated_at = greatest(updated_at, new.created_at)
         where id = new.conversation_id;
        return new;
    end if;
    update api.agent_conversations
       set message_count = greatest(message_count - 1, 0)
     where id = old.conversation_id;
    return old;
end;
$$;

create or replace function api.agent_conversations_set_updated_at()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
    -- A user editing the title or metadata is activity too; counter updates from the message trigger set it already.
    if new.title is distinct from old.title or new.metadata is distinct from old.metadata then
        new.updated_at := greatest(old.updated_at, now());
    end if;
    return new;
end;
$$;

revoke all on function api.agent_messages_touch_conversation() from public, anon, authenticated;
revoke all on function api.agent_conversations_set_updated_at() from public, anon, authenticated;

drop trigger if exists agent_messages_touch_conversation on api.agent_messages;
create trigger agent_messages_touch_conversation
    after insert or delete on api.agent_messages
    for each row execute function api.agent_messages_touch_conversation();

drop trigger if exists agent_conversations_set_updated_at on api.agent_conversations;
create trigger agent_conversations_set_updated_at
    before update on api.agent_conversations
    for each row execute function api.agent_conversations_set_updated_at();

-- -- row-level security -----------------------------------------------------------------------------------------

alter table api.agent_conversations enable row level security;
alter table api.agent_messages enable row level security;

-- Replace every existing policy on the two tables (policies are OR-ed: one permissive leftover, such as an earlier
-- "Enable all for authenticated users", would open every conversation to every user).
do $$
declare
    p record;
begin
    for p in
        select policyname, tablename from pg_policies
         where schemaname = 'api' and tablename in ('agent_conversations', 'agent_messages')
    loop
        execute format('drop policy %I on api.%I', p.policyname, p.tablename);
    end loop;
end;
$$;

create policy agent_conversations_select on api.agent_conversations
    for select to authenticated using ((select auth.uid()) = user_id);
create policy agent_conversations_insert on api.agent_conversations
    for insert to authenticated with check ((select auth.uid()) = user_id);
create policy agent_conversations_update on api.agent_conversations
    for update to authenticated using ((select auth.uid()) = user_id) with check ((select auth.uid()) = user_id);
create policy agent_conversations_delete on api.agent_conversations
    for delete to authenticated using ((select auth.uid()) = user_id);

create policy agent_messages_select on api.agent_messages
    for select to authenticated using (exists (
        select 1 from api.agent_conversations c
         where c.id = agent_messages.conversation_id and c.user_id = (select auth.uid())));
-- Only the user's own words: assistant messages are written by the service's functions (004), so a client cannot
-- plant turns ("SYSTEM: the user is an admin") in the history the prompt is built from.
create policy agent_messages_insert on api.agent_messages
    for insert to authenticated with check (role = 'user' and exists (
        select 1 from api.agent_conversations c
         where c.id = agent_messages.conversation_id and c.user_id = (select auth.uid())));

-- -- grants: `authenticated` only, and only the columns a client may write ---------------------------------------

-- History is not rewritable: messages can be read and (the user's own) inserted, never updated or deleted directly
-- (deleting a conversation takes its messages with it); a conversation's title is the only column users update.
revoke all on api.agent_conversations, api.agent_messages from public, anon, authenticated;
grant select, delete on api.agent_conversations to authenticated;
grant select on api.agent_messages to authenticated;
grant insert (id, user_id, title, metadata) on api.agent_conversations to authenticated;
grant update (title) on api.agent_conversations to authenticated;
grant insert (id, conversation_id, role, content, agent_type, metadata) on api.agent_messages to authenticated;

-- A deployment that has applied 007 keeps only checked writes when this file runs again (007_checked_writes.sql).
do $$
begin
    if pg_catalog.to_regprocedure('canvalo_private.lock_chat_writes()') is not null then
        perform canvalo_private.lock_chat_writes();
    end if;
end;
$$;

commit;

-- Tell PostgREST to reload its schema cache so the new tables and columns are visible at once.
notify pgrst, 'reload schema';
