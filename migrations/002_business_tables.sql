-- Canvalo chat: the business tables the specialists' tools read and write (services/domains.py, services/agents/tools.py).
--
-- Apply after 001 with the SQL editor or `psql "$DATABASE_URL" -f migrations/002_business_tables.sql`. It is safe to
-- run more than once, and safe on a project that already has the earlier service's api.invoices and sibling tables:
-- existing rows are kept, missing columns are added (nullable there: NOT NULL only on the tables created here), and
-- the earlier permissive policies ("Enable all for authenticated users" and the rest) are replaced by the ones below.
--
-- The columns are exactly those declared in services/domains.py (tests/test_postgrest.py compares them), plus id,
-- user_id, created_at and updated_at. Types: date -> date, time -> time (the store returns "HH:MM"), integer ->
-- integer, number -> numeric, uuid -> uuid, json -> jsonb, text and email -> text. Status vocabularies are not CHECK
-- constraints: the tools validate every value against the declarations before any write, and a constraint here would
-- need a migration whenever a vocabulary changes (and could reject the earlier service's existing rows).
--
-- Security model, as in 001: the service sends each user's own access token, so PostgREST runs as `authenticated`,
-- and each table's policies let a user see and change only the rows whose user_id is auth.uid(). Nothing is granted
-- to `anon`. Clients may insert id, user_id and the declared columns and update only the declared columns: id,
-- user_id and the timestamps cannot be changed (updated_at is kept by a trigger).

begin;

create schema if not exists api;
grant usage on schema api to authenticated;

-- -- tables ---------------------------------------------------------------------------------------------------------

create table if not exists api.invoices (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
    invoice_number text not null,
    client_name text not null,
    client_email text,
    client_id uuid,
    project_id uuid,
    issue_date date,
    due_date date not null,
    paid_date date,
    subtotal numeric default 0,
    tax_rate numeric default 0,
    tax_amount numeric default 0,
    discount_amount numeric default 0,
    total_amount numeric not null,
    amount_paid numeric default 0,
    line_items jsonb default '[]'::jsonb,
    status text default 'draft',
    notes text,
    terms text,
    payment_method text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create table if not exists api.appointments (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
    client_name text not null,
    client_id uuid,
    title text,
    description text,
    scheduled_date date not null,
    scheduled_time time not null,
    duration_minutes integer default 60,
    location text,
    status text default 'scheduled',
    notes text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create table if not exists api.projects (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
    name text not null,
    client_name text not null,
    client_id uuid,
    description text,
    start_date date,
    end_date date,
    budget numeric,
    status text default 'planning',
    notes text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create table if not exists api.proposals (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
    title text not null,
    client_name text not null,
    client_id uuid,
    description text,
    total_amount numeric,
    valid_until date,
    status text default 'draft',
    notes text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create table if not exists api.contacts (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
    name text not null,
    email text,
    phone text,
    company text,
    address text,
    contact_type text default 'client',
    notes text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create table if not exists api.reviews (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
    reviewer_name text not null,
    rating integer not null,
    comment text,
    source text,
    status text default 'pending',
    response text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create table if not exists api.campaigns (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
    name text not null,
    campaign_type text default 'email',
    description text,
    start_date date,
    end_date date,
    budget numeric,
    status text default 'draft',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create table if not exists api.tasks (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
    title text not null,
    description text,
    due_date date,
    priority text default 'medium',
    status text default 'todo',
    project_id uuid,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create table if not exists api.goals (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
    title text not null,
    description text,
    goal_type text default 'revenue',
    target_value numeric,
    current_value numeric default 0,
    target_date date,
    progress integer default 0,
    status text default 'not_started',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

-- -- the earlier service's tables: add what they lack (no-ops on the tables created above) --------------------------

alter table api.invoices
    add column if not exists user_id uuid default auth.uid() references auth.users (id) on delete cascade,
    add column if not exists invoice_number text,
    add column if not exists client_name text,
    add column if not exists client_email text,
    add column if not exists client_id uuid,
    add column if not exists project_id uuid,
    add column if not exists issue_date date,
    add column if not exists due_date date,
    add column if not exists paid_date date,
    add column if not exists subtotal numeric default 0,
    add column if not exists tax_rate numeric default 0,
    add column if not exists tax_amount numeric default 0,
    add column if not exists discount_amount numeric default 0,
    add column if not exists total_amount numeric,
    add column if not exists amount_paid numeric default 0,
    add column if not exists line_items jsonb default '[]'::jsonb,
    add column if not exists status text default 'draft',
    add column if not exists notes text,
    add column if not exists terms text,
    add column if not exists payment_method text,
    add column if not exists created_at timestamptz not null default now(),
    add column if not exists updated_at timestamptz not null default now();

alter table api.appointments
    add column if not exists user_id uuid default auth.uid() references auth.users (id) on delete cascade,
    add column if not exists client_name text,
    add column if not exists client_id uuid,
    add column if not exists title text,
    add column if not exists description text,
    add column if not exists scheduled_date date,
    add column if not exists scheduled_time time,
    add column if not exists duration_minutes integer default 60,
    add column if not exists location text,
    add column if not exists status text default 'scheduled',
    add column if not exists notes text,
    add column if not exists created_at timestamptz not null default now(),
    add column if not exists updated_at timestamptz not null default now();

alter table api.projects
    add column if not exists user_id uuid default auth.uid() references auth.users (id) on delete cascade,
    add column if not exists name text,
    add column if not exists client_name text,
    add column if not exists client_id uuid,
    add column if not exists description text,
    add column if not exists start_date date,
    add column if not exists end_date date,
    add column if not exists budget numeric,
    add column if not exists status text default 'planning',
    add column if not exists notes text,
    add column if not exists created_at timestamptz not null default now(),
    add column if not exists updated_at timestamptz not null default now();

alter table api.proposals
    add column if not exists user_id uuid default auth.uid() references auth.users (id) on delete cascade,
    add column if not exists title text,
    add column if not exists client_name text,
    add column if not exists client_id uuid,
    add column if not exists description text,
    add column if not exists total_amount numeric,
    add column if not exists valid_until date,
    add column if not exists status text default 'draft',
    add column if not exists notes text,
    add column if not exists created_at timestamptz not null default now(),
    add column if not exists updated_at timestamptz not null default now();

alter table api.contacts
    add column if not exists user_id uuid default auth.uid() references auth.users (id) on delete cascade,
    add column if not exists name text,
    add column if not exists email text,
    add column if not exists phone text,
    add column if not exists company text,
    add column if not exists address text,
    add column if not exists contact_type text default 'client',
    add column if not exists notes text,
    add column if not exists created_at timestamptz not null default now(),
    add column if not exists updated_at timestamptz not null default now();

alter table api.reviews
    add column if not exists user_id uuid default auth.uid() references auth.users (id) on delete cascade,
    add column if not exists reviewer_name text,
    add column if not exists rating integer,
    add column if not exists comment text,
    add column if not exists source text,
    add column if not exists status text default 'pending',
    add column if not exists response text,
    add column if not exists created_at timestamptz not null default now(),
    add column if not exists updated_at timestamptz not null default now();

alter table api.campaigns
    add column if not exists user_id uuid default auth.uid() references auth.users (id) on delete cascade,
    add column if not exists name text,
    add column if not exists campaign_type text default 'email',
    add column if not exists description text,
    add column if not exists start_date date,
    add column if not exists end_date date,
    add column if not exists budget numeric,
    add column if not exists status text default 'draft',
    add column if not exists created_at timestamptz not null default now(),
    add column if not exists updated_at timestamptz not null default now();

alter table api.tasks
    add column if not exists user_id uuid default auth.uid() references auth.users (id) on delete cascade,
    add column if not exists title text,
    add column if not exists description text,
    add column if not exists due_date date,
    add column if not exists priority text default 'medium',
    add column if not exists status text default 'todo',
    add column if not exists project_id uuid,
    add column if not exists created_at timestamptz not null default now(),
    add column if not exists updated_at timestamptz not null default now();

alter table api.goals
    add column if not exists user_id uuid default auth.uid() references auth.users (id) on delete cascade,
    add column if not exists title text,
    add column if not exists description text,
    add column if not exists goal_type text default 'revenue',
    add column if not exists target_value numeric,
    add column if not exists current_value numeric default 0,
    add column if not exists target_date date,
    add column if not exists progress integer default 0,
    add column if not exists status text default 'not_started',
    add column if not exists created_at timestamptz not null default now(),
    add column if not exists updated_at timestamptz not null default now();

-- Per table: timestamp defaults, owner NOT NULL, the updated_at trigger, row-level security, policies and grants.
create or replace function api.business_records_set_updated_at()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
    new.updated_at := now();
    return new;
end;
$$;

revoke all on function api.business_records_set_updated_at() from public, anon, authenticated;

do $$
declare
    t text;
    p record;
    ownerless boolean;
begin
    foreach t in array array['invoices', 'appointments', 'projects', 'proposals', 'contacts', 'reviews', 'campaigns',
                             'tasks', 'goals']
    loop
        -- The earlier service created some timestamp columns without defaults.
        execute format('alter table api.%I alter column created_at set default now()', t);
        execute format('alter table api.%I alter column updated_at set default now()', t);

        -- The earlier service added user_id as nullable and never backfilled it. Where every row has an owner the
        -- column becomes NOT NULL; otherwise a NOT VALID check refuses new ownerless rows and leaves the old ones,
        -- which no policy below lets anyone see, for the project owner to assign or delete.
        if exists (select 1 from pg_attribute
                    where attrelid = format('api.%I', t)::regclass and attname = 'user_id' and not attnotnull) then
            execute format('select exists (select 1 from api.%I where user_id is null)', t) into ownerless;
            if not ownerless then
                execute format('alter table api.%I alter column user_id set not null', t);
            elsif not exists (select 1 from pg_constraint
                               where conrelid = format('api.%I', t)::regclass
                                 and conname = t || '_user_id_present') then
                execute format('alter table api.%I add constraint %I check (user_id is not null) not valid',
                               t, t || '_user_id_present');
            end if;
        end if;

        -- Ours replaces the earlier service's update_<table>_updated_at trigger (its function,
        -- update_updated_at_column(), was never part of that repository), so exactly one trigger stamps updates.
        execute format('drop trigger if exists %I on api.%I', 'update_' || t || '_updated_at', t);
        execute format('drop trigger if exists %I on api.%I', t || '_set_updated_at', t);
        execute format('create trigger %I before update on api.%I for each row'
                       ' execute function api.business_records_set_updated_at()', t || '_set_updated_at', t);

        -- Replace every existing policy (policies are OR-ed: one permissive leftover such as "Enable all for
        -- authenticated users" would open every user's records to every other user).
        execute format('alter table api.%I enable row level security', t);
        for p in select policyname from pg_policies where schemaname = 'api' and tablename = t loop
            execute format('drop policy %I on api.%I', p.policyname, t);
        end loop;
        execute format('create policy %I on api.%I for select to authenticated'
                       ' using ((select auth.uid()) = user_id)', t || '_select', t);
        execute format('create policy %I on api.%I for insert to authenticated'
                       ' with check ((select auth.uid()) = user_id)', t || '_insert', t);
        execute format('create policy %I on api.%I for update to authenticated'
                       ' using ((select auth.uid()) = user_id) with check ((select auth.uid()) = user_id)',
                       t || '_update', t);
        execute format('create policy %I on api.%I for delete to authenticated'
                       ' using ((select auth.uid()) = user_id)', t || '_delete', t);

        -- `authenticated` only (the earlier service granted select to anon); writable columns are granted below.
        execute format('revoke all on api.%I from public, anon, authenticated', t);
        execute format('grant select, delete on api.%I to authenticated', t);
    end loop;
end;
$$;

-- -- indexes: a user's records in each list tool's order (services/domains.py order_by, then id) -------------------

create index if not exists invoices_user_order_idx on api.invoices
    (user_id, created_at desc nulls last, id);
create index if not exists appointments_user_order_idx on api.appointments
    (user_id, scheduled_date asc nulls first, scheduled_time asc nulls first, id);
create index if not exists projects_user_order_idx on api.projects
    (user_id, created_at desc nulls last, id);
create index if not exists proposals_user_order_idx on api.proposals
    (user_id, created_at desc nulls last, id);
create index if not exists contacts_user_order_idx on api.contacts
    (user_id, name asc nulls first, id);
create index if not exists reviews_user_order_idx on api.reviews
    (user_id, created_at desc nulls last, id);
create index if not exists campaigns_user_order_idx on api.campaigns
    (user_id, created_at desc nulls last, id);
create index if not exists tasks_user_order_idx on api.tasks
    (user_id, due_date asc nulls first, created_at asc nulls first, id);
create index if not exists goals_user_order_idx on api.goals
    (user_id, target_date asc nulls first, created_at asc nulls first, id);

-- -- column grants: ids and owners only on insert, never on update; timestamps never --------------------------------

grant insert (
    id, user_id, invoice_number, client_name, client_email, client_id, project_id, issue_date, due_date,
    paid_date, subtotal, tax_rate, tax_amount, discount_amount, total_amount, amount_paid, line_items, status,
    notes, terms, payment_method
) on api.invoices to authenticated;
grant update (
    invoice_number, client_name, client_email, client_id, project_id, issue_date, due_date, paid_date, subtotal,
    tax_rate, tax_amount, discount_amount, total_amount, amount_paid, line_items, status, notes, terms,
    payment_method
) on api.invoices to authenticated;
grant insert (
    id, user_id, client_name, client_id, title, description, scheduled_date, scheduled_time, duration_minutes,
    location, status, notes
) on api.appointments to authenticated;
grant update (
    client_name, client_id, title, description, scheduled_date, scheduled_time, duration_minutes, location,
    status, notes
) on api.appointments to authenticated;
grant insert (
    id, user_id, name, client_name, client_id, description, start_date, end_date, budget, status, notes
) on api.projects to authenticated;
grant update (
    name, client_name, client_id, description, start_date, end_date, budget, status, notes
) on api.projects to authenticated;
grant insert (
    id, user_id, title, client_name, client_id, description, total_amount, valid_until, status, notes
) on api.proposals to authenticated;
grant update (
    title, client_name, client_id, description, total_amount, valid_until, status, notes
) on api.proposals to authenticated;
grant insert (
    id, user_id, name, email, phone, company, address, contact_type, notes
) on api.contacts to authenticated;
grant update (
    name, email, phone, company, address, contact_type, notes
) on api.contacts to authenticated;
grant insert (
    id, user_id, reviewer_name, rating, comment, source, status, response
) on api.reviews to authenticated;
grant update (
    reviewer_name, rating, comment, source, status, response
) on api.reviews to authenticated;
grant insert (
    id, user_id, name, campaign_type, description, start_date, end_date, budget, status
) on api.campaigns to authenticated;
grant update (
    name, campaign_type, description, start_date, end_date, budget, status
) on api.campaigns to authenticated;
grant insert (
    id, user_id, title, description, due_date, priority, status, project_id
) on api.tasks to authenticated;
grant update (
    title, description, due_date, priority, status, project_id
) on api.tasks to authenticated;
grant insert (
    id, user_id, title, description, goal_type, target_value, current_value, target_date, progress, status
) on api.goals to authenticated;
grant update (
    title, description, goal_type, target_value, current_value, target_date, progress, status
) on api.goals to authenticated;

commit;

-- Tell PostgREST to reload its schema cache so the new tables and columns are visible at once.
notify pgrst, 'reload schema';
