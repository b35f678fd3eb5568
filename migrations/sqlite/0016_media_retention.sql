-- flowgate schema, version 16 (SQLite): pruning customers' files with the history.

-- Files are kept by their content, so one file can serve several rows: the retention
-- deletes a file only when no row names it any more, which this index answers without
-- reading the table.
CREATE INDEX media_by_store_key ON media (store_key) WHERE store_key IS NOT NULL;
