-- flowgate schema, version 16 (PostgreSQL): mirrors migrations/sqlite/0016_media_retention.sql
-- (pruning customers' files with the history).

CREATE INDEX media_by_store_key ON media (store_key) WHERE store_key IS NOT NULL;
