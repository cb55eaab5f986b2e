-- jsonb keeps an object's keys shorter first, then bytewise, not in the order they were sent: a function's
-- `parameters` and a json_schema `schema` would reach the model (and come back) with their properties in
-- another order than the user chose, and models fill them in that order. `as_sent` keeps, as json (which keeps
-- the text), the top-level fields of `doc` whose key order is the user's (`doc_as_sent`); reads lay it over
-- `doc`. `doc` stays the copy that SQL queries and indexes. NULL (rows from before): `doc` as it is.
ALTER TABLE assistants ADD COLUMN IF NOT EXISTS as_sent json;
ALTER TABLE threads ADD COLUMN IF NOT EXISTS as_sent json;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS as_sent json;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS as_sent json;

-- The fields of a document (as json) that keep their text in `as_sent`; NULL if it has none of them.
CREATE OR REPLACE FUNCTION doc_as_sent(doc json) RETURNS json LANGUAGE sql IMMUTABLE AS $$
    SELECT json_object_agg(key, value) FROM json_each(doc) WHERE key IN ('tools', 'response_format', 'metadata')
$$;

-- `base` with the fields of `patch` replaced or added, every value's text kept (`||` for json).
CREATE OR REPLACE FUNCTION json_overlay(base json, patch json) RETURNS json LANGUAGE sql IMMUTABLE AS $$
    SELECT json_object_agg(key, value) FROM (
        SELECT key, value FROM json_each(coalesce(base, '{}'))
            WHERE key NOT IN (SELECT json_object_keys(coalesce(patch, '{}')))
        UNION ALL SELECT key, value FROM json_each(coalesce(patch, '{}'))) AS fields
$$;
