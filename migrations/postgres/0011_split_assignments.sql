-- flowgate schema, version 11 (PostgreSQL): mirrors
-- migrations/sqlite/0011_split_assignments.sql (A/B splits, the branch each contact was
-- sent down, and when they reached it, replied, finished the flow or were handed off).

CREATE TABLE split_assignments (
    contact_id BIGINT NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    flow TEXT NOT NULL,
    step TEXT NOT NULL,
    branch TEXT NOT NULL,
    reached_at BIGINT NOT NULL,
    replied_at BIGINT,
    finished_at BIGINT,
    handed_off_at BIGINT,
    PRIMARY KEY (contact_id, flow, step)
);

CREATE INDEX split_assignments_by_branch ON split_assignments (flow, step, branch);
