-- A message's data is read back exactly as the producer wrote it. jsonb rewrote numbers into
-- PostgreSQL's numeric (1.7976931348623157e308 came back as 309 digits, which no f64 parser
-- reads), so a message whose data was accepted could no longer be listed: found by schemathesis.
alter table messages alter column data type json using data::json;
