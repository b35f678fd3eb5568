-- flowgate schema, version 11 (SQLite): A/B splits, the branch each contact was sent down.

-- One row per contact and split (a flow's `split` step): the branch the contact takes (the
-- same every time, chosen by a hash) and when they first reached it, then replied, finished
-- the flow or were handed to a person after it. Written in the turn that does it.
CREATE TABLE split_assignments (
    contact_id INTEGER NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    flow TEXT NOT NULL,
    step TEXT NOT NULL,
    branch TEXT NOT NULL,
    reached_at INTEGER NOT NULL,
    replied_at INTEGER,
    finished_at INTEGER,
    handed_off_at INTEGER,
    PRIMARY KEY (contact_id, flow, step)
) WITHOUT ROWID;

-- The per-branch report groups by split and branch.
CREATE INDEX split_assignments_by_branch ON split_assignments (flow, step, branch);
