-- Functions the migrations may call, defined by the migrator in its own session before it applies
-- any and dropped after, so that no migration defines its own copy. (outbox V6 and V7 shipped with
-- their own `pg_temp.rewrite`; a shipped migration's text stays as it ran.)

-- Replaces `old` by `new` in the definition of the function `fn` and runs the result: a change of a
-- few lines without restating the whole function. Fails when `old` is not found, so a migration
-- never applies silently to a function that differs from the one it was written against.
create or replace function pg_temp.rewrite_function(fn regprocedure, old text, new text)
returns void language plpgsql as $$
declare
    before text := pg_get_functiondef(fn);
    after  text := replace(before, old, new);
begin
    if after = before then
        raise exception '%: the text to rewrite was not found: %', fn, old;
    end if;
    execute after;
end $$;
