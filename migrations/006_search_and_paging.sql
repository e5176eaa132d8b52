-- Canvalo chat: conversation search and cursor paging for the Supabase store (services/store/postgrest/store.py).
--
-- Apply after 001-005 with the SQL editor or `psql "$DATABASE_URL" -f migrations/006_search_and_paging.sql`; safe to
-- run more than once. It adds:
--
--   POST /rest/v1/rpc/agent_conversations_search  {"p_terms": ["kitch", "inv"], "p_limit": 51, "p_offset": 0,
--                                                  "p_before_at", "p_before_id", "p_after_at", "p_after_id"}
--        -> {"total": 3, "rows": [{conversation}, ...]}
--
-- the caller's conversations whose title, or one of whose messages, holds a word starting with each term
-- (services/store/search.py says what a term is), by last activity like the list, with the same cursors. Words are found
-- by full-text indexes (GIN over a tsvector of the text, 'simple' configuration: no stemming, no stop words, as
-- SQLite's FTS5 unicode61). ASCII punctuation is read as a space first, so "ben@carter.com" and "INV-1043" are
-- words "ben", "carter", "com", "inv", "1043", as FTS5 splits them (PostgreSQL's parser alone would keep the e-mail
-- address whole).
--
-- Cursor paging needs no new index: conversations page by (user_id, updated_at desc, id) and messages by
-- (conversation_id, created_at, seq), the indexes of 001. It does need updated_at never to be null (the earlier
-- service's column allowed it): such rows get their latest activity, and the column becomes NOT NULL.
--
-- Security model: the search function is SECURITY INVOKER, so it reads conversations as the caller, under their
-- row-level security. Finding the words is delegated to canvalo_private.matching_conversations, SECURITY DEFINER
-- because row-level security keeps an operator that is not leakproof, such as tsvector @@ tsquery, from using an
-- index beneath the policies' own conditions: as the user, every message the user can see would be read and parsed.
-- It returns only ids of conversations whose user_id is auth.uid(), by an explicit condition, and the invoker's read
-- then applies row-level security again. Nothing is granted to `anon`.

begin;

-- -- a total order for cursors ------------------------------------------------------------------------------------

update api.agent_conversations
   set updated_at = greatest(created_at, coalesce(last_message_at, created_at))
 where updated_at is null;
alter table api.agent_conversations alter column updated_at set default now();
alter table api.agent_conversations alter column updated_at set not null;

-- -- full-text indexes --------------------------------------------------------------------------------------------

-- The words of a text as a tsvector. IMMUTABLE and plain SQL with qualified names and no SET clause, so PostgreSQL
-- inlines it and the queries below match the indexes' expression.
create or replace function canvalo_private.search_vector(p_text text)
returns tsvector
language sql
immutable
parallel safe
as $$
    select pg_catalog.to_tsvector(
        'pg_catalog.simple'::pg_catalog.regconfig,
        pg_catalog.regexp_replace(coalesce(p_text, ''), '[!-/:-@[-`{-~]+', ' ', 'g'))
$$;

create index if not exists agent_messages_search_idx
    on api.agent_messages using gin (canvalo_private.search_vector(content));
create index if not exists agent_conversations_search_idx
    on api.agent_conversations using gin (canvalo_private.search_vector(title));

-- -- search -------------------------------------------------------------------------------------------------------

-- The caller's conversations holding every word of p_query in their title or in one of their messages.
create or replace function canvalo_private.matching_conversations(p_query tsquery)
returns setof uuid
language sql
stable
security definer
set search_path = ''
as $$
    select c.id
      from api.agent_conversations c
     where c.user_id = (select auth.uid()) and canvalo_private.search_vector(c.title) @@ p_query
    union
    select m.conversation_id
      from api.agent_messages m
      join api.agent_conversations c on c.id = m.conversation_id
     where c.user_id = (select auth.uid()) and canvalo_private.search_vector(m.content) @@ p_query
$$;

-- Store.list_conversations with a search (services/store/sqlite/listing.py is the reference): the matches by last activity
-- (updated_at descending, then id), p_offset and p_limit of them, or those older than (p_before_at, p_before_id) or
-- newer than (p_after_at, p_after_id), nearest first: an `after` page comes newest-last and the service turns it
-- round. `total` counts every match, whatever the page.
create or replace function api.agent_conversations_search(
    p_terms text[],
    p_limit integer,
    p_offset integer default 0,
    p_before_at timestamptz default null,
    p_before_id uuid default null,
    p_after_at timestamptz default null,
    p_after_id uuid default null
)
returns jsonb
language plpgsql
stable
set search_path = ''
as $$
declare
    uid uuid := auth.uid();
    query tsquery;
begin
    if uid is null then
        raise exception 'agent_conversations_search requires a signed-in user' using errcode = '42501';
    end if;
    if p_limit is null or p_limit < 0 or p_offset is null or p_offset < 0
       or (p_before_at is null) <> (p_before_id is null) or (p_after_at is null) <> (p_after_id is null) then
        raise exception 'invalid search page' using errcode = '22023';
    end if;
    -- Every term a quoted prefix, all required ('kitch':* & 'inv':*): nothing in a term is read as query syntax.
    select pg_catalog.to_tsquery('pg_catalog.simple',
                                 pg_catalog.string_agg(pg_catalog.quote_literal(t.term) || ':*', ' & '))
      into query
      from pg_catalog.unnest(p_terms) as t (term)
     where t.term <> '';
    if query is null or pg_catalog.numnode(query) = 0 then
        return pg_catalog.jsonb_build_object('total', 0, 'rows', '[]'::jsonb);
    end if;
    return (
        with hits as (
            select c.id, c.user_id, c.title, c.created_at, c.updated_at, c.last_message_at, c.message_count,
                   c.metadata
              from api.agent_conversations c
             where c.user_id = uid and c.id in (select canvalo_private.matching_conversations(query))
        ),
        ordered as (
            select h.*, pg_catalog.row_number() over (
                       order by case when p_after_at is null then h.updated_at end desc,
                                case when p_after_at is null then h.id end,
                                h.updated_at, h.id desc) as n
              from hits h
             where (p_before_at is null or h.updated_at < p_before_at
                    or (h.updated_at = p_before_at and h.id > p_before_id))
               and (p_after_at is null or h.updated_at > p_after_at
                    or (h.updated_at = p_after_at and h.id < p_after_id))
        )
        select pg_catalog.jsonb_build_object(
            'total', (select pg_catalog.count(*) from hits),
            'rows', coalesce((select pg_catalog.jsonb_agg(pg_catalog.to_jsonb(o) - 'n' order by o.n)
                                from ordered o
                               where o.n > p_offset and o.n <= p_offset + p_limit), '[]'::jsonb))
    );
end;
$$;

revoke all on function canvalo_private.matching_conversations(tsquery) from public, anon;
revoke all on function api.agent_conversations_search(text[], integer, integer, timestamptz, uuid, timestamptz, uuid)
    from public, anon;
grant execute on function canvalo_private.search_vector(text) to authenticated;
grant execute on function canvalo_private.matching_conversations(tsquery) to authenticated;
grant execute on function api.agent_conversations_search(text[], integer, integer, timestamptz, uuid, timestamptz,
                                                         uuid) to authenticated;

-- A deployment that has applied 007 keeps only checked writes when this file runs again (007_checked_writes.sql).
do $$
begin
    if pg_catalog.to_regprocedure('canvalo_private.lock_chat_writes()') is not null then
        perform canvalo_private.lock_chat_writes();
    end if;
end;
$$;

commit;

-- Tell PostgREST to reload its schema cache so the new function is visible at once.
notify pgrst, 'reload schema';
