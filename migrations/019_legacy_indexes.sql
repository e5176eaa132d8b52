-- Canvalo chat: the earlier FastAPI service's own indexes on the chat tables are dropped, so a long message can be
-- saved on a project that upgraded from it.
--
-- Apply after 001-018 (`for f in migrations/*.sql; ...`, README); safe to run more than once, at any time, and a no-op
-- on a project that never ran the earlier service (none of these indexes exist there). No row is changed.
--
-- 001 upgrades the earlier service's api.agent_conversations/api.agent_messages in place and replaced their triggers
-- and policies, but left their indexes. One of them, idx_agent_messages_conversation_covering (its
-- performance-indexes.sql: `(conversation_id, created_at) include (content, role, agent_type, metadata)`), keeps each
-- message's whole content in a btree row, which PostgreSQL caps at 2704 bytes (after compression): a user's message
-- or an answer longer than that (about 2,700 characters of ordinary text; the service accepts 10,000 and answers
-- longer) was refused with 54000 "index row size ... exceeds btree version 4 maximum", so the turn failed (502
-- STORE_ERROR) or its answer could not be saved. The others duplicate 001's and 007's indexes (the history order, the
-- list order, search over `words`) and cost every write: to_tsvector('english', content) on each of an answer's
-- once-a-second saves, and a row for each in every conversation update. The service's own indexes are untouched.

begin;

drop index if exists api.idx_agent_messages_conversation_covering;
drop index if exists api.idx_agent_messages_content_gin;
drop index if exists api.idx_agent_messages_conversation;
drop index if exists api.idx_agent_messages_conversation_recent;
drop index if exists api.idx_agent_messages_agent_type;
drop index if exists api.idx_agent_messages_role;
drop index if exists api.idx_agent_conversations_user;
drop index if exists api.idx_agent_conversations_user_updated_count;
drop index if exists api.idx_agent_conversations_last_message;
drop index if exists api.idx_agent_conversations_title_gin;

commit;
