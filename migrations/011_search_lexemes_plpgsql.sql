-- Canvalo chat: the search words of a message cost a fraction of what they did, with the same words.
--
-- Apply after 001-010 (`for f in migrations/*.sql; ...`, README); safe to run more than once. Nothing is rewritten:
-- every stored `words` value stays as it is, since the function's result for any text is unchanged.
--
-- 008's search_lexemes and search_lexemes_vector were SQL functions with their own search_path, which PostgreSQL
-- neither inlines nor keeps a plan of between statements: every insert and update of a message or a conversation
-- (the generated `words` columns) parsed and planned both bodies again, about three quarters of the words' cost
-- (measured with pg_stat_statements: 0.22 ms a call, of which the folding itself 0.06 ms). A streaming answer's text
-- is rewritten every second, so this was paid per run per second. As PL/pgSQL, each session plans them once.

begin;

create or replace function canvalo_private.search_lexemes(p_text text)
returns text[]
language plpgsql
immutable
parallel safe
set search_path = ''
as $$
begin
    return (
        select coalesce(pg_catalog.array_agg(w.word order by w.first), '{}')
          from (select s.word, pg_catalog.min(s.n) as first
                  from pg_catalog.regexp_split_to_table(
                           pg_catalog.lower(pg_catalog.normalize(coalesce(p_text, ''), 'NFKC') collate "und-x-icu"),
                           '[^[:alnum:]]+') with ordinality as s (word, n)
                 where s.word <> '' and pg_catalog.char_length(s.word) <= 100
                 group by s.word
                 order by first
                 limit 2000) as w);
end;
$$;

create or replace function canvalo_private.search_lexemes_vector(p_text text)
returns tsvector
language plpgsql
immutable
parallel safe
set search_path = ''
as $$
begin
    return pg_catalog.array_to_tsvector(canvalo_private.search_lexemes(p_text));
end;
$$;

select canvalo_private.lock_chat_writes();

commit;
