-- flowgate schema, version 15: campaign splits (A/B). The variant of a split campaign each
-- recipient of a run was given (chosen per contact and campaign when the audience is
-- snapshotted, and set again to the variant actually used when the recipient is decided);
-- NULL for a campaign without `split:`. Reports group a run's recipients by it.

ALTER TABLE campaign_recipients ADD COLUMN variant TEXT;
