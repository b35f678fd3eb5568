-- flowgate schema, version 15 (PostgreSQL): mirrors
-- migrations/sqlite/0015_campaign_variants.sql (the variant of a split campaign each
-- recipient of a run was given; NULL without `split:`).

ALTER TABLE campaign_recipients ADD COLUMN variant TEXT;
