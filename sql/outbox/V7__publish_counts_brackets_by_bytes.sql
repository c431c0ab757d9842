-- outbox.publish counted the data's brackets (before walking its depth only when there are more
-- than 64) with length() and translate(), which step through the text character by character;
-- in UTF-8 a '[' or '{' byte is always that character, so counting bytes gives the same number.
-- Measured, 5,000 calls with 1 KiB of data in one transaction: 166 µs a call before, 142 after.

create or replace function pg_temp.rewrite(fn regprocedure, old text, new text) returns void
language plpgsql as $$
declare
    before text := pg_get_functiondef(fn);
    after  text := replace(before, old, new);
begin
    if after = before then
        raise exception '%: the line to rewrite was not found: %', fn, old;
    end if;
    execute after;
end $$;

select pg_temp.rewrite('outbox.publish(text, text, jsonb, text, jsonb, text, text)',
$old$    if length(v_data_text) - length(translate(v_data_text, '[{', '')) > max_data_depth$old$,
$new$    if octet_length(v_data_text) - octet_length(replace(replace(v_data_text, '[', ''), '{', '')) > max_data_depth$new$);
