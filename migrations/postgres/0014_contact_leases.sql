-- flowgate schema, version 14 (PostgreSQL): mirrors migrations/sqlite/0014_contact_leases.sql
-- (contact leases: which instance may run a contact's turns), plus the notifications that
-- wake the other instances, sent in the transaction that writes:
--   flowgate_inbox   a webhook's updates were stored
--   flowgate_outbox  an outbound message is pending (the payload is its channel)
--   flowgate_leases  a contact's lease was released (its next update may be taken)

CREATE TABLE contact_leases (
    channel TEXT NOT NULL,
    contact_key TEXT NOT NULL,
    owner TEXT NOT NULL,
    lease_until BIGINT NOT NULL,
    PRIMARY KEY (channel, contact_key)
);

CREATE INDEX contact_leases_by_owner ON contact_leases (owner);

CREATE FUNCTION flowgate_notify_inbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flowgate_inbox', '');
    RETURN NULL;
END $$;

CREATE TRIGGER inbox_notify AFTER INSERT ON inbox
    FOR EACH STATEMENT EXECUTE FUNCTION flowgate_notify_inbox();

CREATE FUNCTION flowgate_notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flowgate_outbox', NEW.channel);
    RETURN NULL;
END $$;

CREATE TRIGGER messages_notify_outbox AFTER INSERT ON messages
    FOR EACH ROW WHEN (NEW.direction = 'out' AND NEW.status = 'pending')
    EXECUTE FUNCTION flowgate_notify_outbox();

CREATE FUNCTION flowgate_notify_leases() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flowgate_leases', '');
    RETURN NULL;
END $$;

CREATE TRIGGER contact_leases_notify AFTER DELETE ON contact_leases
    FOR EACH STATEMENT EXECUTE FUNCTION flowgate_notify_leases();
