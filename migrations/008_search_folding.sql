-- Canvalo chat: search finds a word typed as it is stored, in any script.
--
-- Apply after 001-007 (`for f in migrations/*.sql; ...`, README); safe to run more than once. 007 indexed the words
-- PostgreSQL's text-search parser and the database's locale make of a text, and the service folded the words it
-- searched for its own way: with the C locale nothing but ASCII is lowercased, so "İstanbul", a Cherokee, Georgian or
-- Adlam capital, or an accent typed as a combining character was not found as typed. Now one function folds both
-- the stored text and the search (services/store/search.py says what a search means; SQLite folds alike, in Python):
--
--   canvalo_private.search_lexemes(text) -> text[]: NFKC, then lowercase by ICU's root locale (Unicode's rules,
--   whatever the database's locale), then the runs of letters and digits, distinct, at most 100 characters each,
--   the first 2,000 (a tsvector holds at most 1 MB: a longer text's later new words are not indexed, rather than its
--   write failing).
--
-- The lexemes are made into a tsvector as they are (array_to_tsvector) and the search into a tsquery of quoted
-- prefixes (a cast, which normalises nothing), so no parser, dictionary or locale stands between them. Requires
-- PostgreSQL built with ICU (Supabase's and Debian's are). The words columns are rebuilt once, the first time this
-- file runs: a rewrite of agent_messages and agent_conversations.

begin;

create or replace function canvalo_private.search_lexemes(p_text text)
returns text[]
language sql
immutable
parallel safe
set search_path = ''
as $$
    select coalesce(pg_catalog.array_agg(w.word order by w.first), '{}')
      from (select s.word, pg_catalog.min(s.n) as first
              from pg_catalog.regexp_split_to_table(
                       pg_catalog.lower(pg_catalog.normalize(coalesce(p_text, ''), 'NFKC') collate "und-x-icu"),
                       '[^[:alnum:]]+') with ordinality as s (word, n)
             where s.word <> '' and pg_catalog.char_length(s.word) <= 100
             group by s.word
             order by first
             limit 2000) as w
$$;

create or replace function canvalo_private.search_lexemes_vector(p_text text)
returns tsvector
language sql
immutable
parallel safe
set search_path = ''
as $$
    select pg_catalog.array_to_tsvector(canvalo_private.search_lexemes(p_text))
$$;

-- The search's tsquery: every lexeme of the terms as a quoted prefix, all required; null when there is none.
create or replace function canvalo_private.search_query(p_terms text[])
returns tsquery
language sql
stable
set search_path = ''
as $$
    select pg_catalog.string_agg('''' || l.lexeme || ''':*', ' & ')::tsquery
      from (select pg_catalog.unnest(canvalo_private.search_lexemes(pg_catalog.array_to_string(p_terms, ' ')))
            limit 32) as l (lexeme)
$$;

-- A words column 007 made (from the text-search parser) is rebuilt from search_lexemes, with its index.
do $$
declare
    t text;
begin
    foreach t in array array['agent_messages', 'agent_conversations'] loop
        if exists (select 1
                     from pg_catalog.pg_attrdef d
                     join pg_catalog.pg_attribute a on a.attrelid = d.adrelid and a.attnum = d.adnum
                    where d.adrelid = pg_catalog.format('api.%I', t)::regclass and a.attname = 'words'
                      and pg_catalog.pg_get_expr(d.adbin, d.adrelid) not like '%search_lexemes_vector%') then
            execute pg_catalog.format('alter table api.%I drop column words', t);
        end if;
    end loop;
end;
$$;
alter table api.agent_messages add column if not exists words tsvector
    generated always as (canvalo_private.search_lexemes_vector(content)) stored;
alter table api.agent_conversations add column if not exists words tsvector
    generated always as (canvalo_private.search_lexemes_vector(title)) stored;
create index if not exists agent_messages_words_idx on api.agent_messages using gin (words);
create index if not exists agent_conversations_words_idx on api.agent_conversations using gin (words);

select canvalo_private.lock_chat_writes();

commit;
